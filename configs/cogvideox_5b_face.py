"""Erase a person's identity from CogVideoX-5B: η 5 (published for faces), the other identities preserved.

unlearn-jax erase --config configs/cogvideox_5b_face.py --config.model.path /path/to/CogVideoX-5b \
    --config.prompts.file prompts/face.jsonl
"""
from unlearn_jax.erase_config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/cogvideox_5b_face"
    # The first identity of the published face set (face_cogvideox.csv); the other four are preserved.
    c.concepts = [{"phrase": "Angela Merkel", "type": "face",
                   "preserve": ["Barack Obama", "Donald Trump", "Joe Biden", "Queen Elizabeth II"]}]
    c.erase.eta = 5.0
    c.erase.alpha_loc = 1.0
    c.train.num_steps = 500
    c.train.learning_rate = 1e-4
    c.eraser.rank = 128
    c.model.remat = "full"
    return c
