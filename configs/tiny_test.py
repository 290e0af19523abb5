"""A tiny erasure for tests and smoke runs: fp32, 4 sampler steps, rank 4, 4 training steps.

unlearn-jax erase --config configs/tiny_test.py --config.model.path PIPELINE --config.workdir runs/tiny
(the pipeline: a tiny CogVideoX folder such as tests/helpers_erase.py builds).
"""
from unlearn_jax.erase_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/tiny_test"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.attention = "xla"
    c.video.num_frames = 2  # a pipeline without vae/ samples pixel-sized latents
    c.video.height = 8
    c.video.width = 8
    c.concepts = [{"phrase": "red cat", "type": "object", "preserve": ["blue dog"]}]
    c.sampler.num_steps = 4
    c.eraser.rank = 4
    c.train.num_steps = 4
    c.train.learning_rate = 1e-3
    c.train.checkpoint_every = 2
    c.export.formats = ["erasers"]
    # One device: the tiny run is about the loop, not sharding (tests/core/test_erasure_sharding.py and
    # tests/core/test_multihost.py cover meshes); it also keeps XLA:CPU collectives out of the loop tests.
    c.mesh.shape = {"data": 1, "fsdp": 1, "tensor": 1}
    return c
