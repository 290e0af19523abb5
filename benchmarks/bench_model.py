"""The CogVideoX-shaped model the speed benchmarks share: its shape arguments and the diffusers model.

5B-style (RoPE), width heads x 64, 16 latent channels, T5-XXL-sized text embeddings (4096).
"""

TEXT_DIM = 4096
CHANNELS = 16


def add_shape_args(ap):
    """The model and input shape options (latent frames / height / width)."""
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--frames", type=int, default=5, help="latent frames")
    ap.add_argument("--height", type=int, default=16, help="latent height")
    ap.add_argument("--width", type=int, default=24, help="latent width")
    ap.add_argument("--text-len", type=int, default=226)


def diffusers_model(args):
    """(the diffusers model with seed-0 random weights, eval mode; its parameter count)."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    cfg = dict(num_attention_heads=args.heads, attention_head_dim=64, in_channels=CHANNELS, out_channels=CHANNELS,
               time_embed_dim=512, text_embed_dim=TEXT_DIM, num_layers=args.layers, sample_width=args.width,
               sample_height=args.height, sample_frames=(args.frames - 1) * 4 + 1,
               max_text_seq_length=args.text_len, use_rotary_positional_embeddings=True)
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**cfg).eval()
    return model, sum(p.numel() for p in model.parameters())
