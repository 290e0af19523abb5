"""Paths inside the repository that tests read (nothing outside it)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"
MODEL_CONFIGS = TEST_DATA / "model_configs"  # full-size configs (rule coverage, memory plans) and schedulers
TOY_WORLD = ROOT / "assets" / "toy_world"
