"""`unlearn_jax.prompt_sets`: the one prompt CSV reader (used by `unlearn-jax sample --prompts` and
the evaluation) and seed checking, on the published prompt sets and on small synthetic files."""
from pathlib import Path

import numpy as np
import pytest

from unlearn_jax import prompt_sets as PS
from unlearn_jax.errors import UnlearnError

PROMPTS = PS.resolve_prompt_set("nudity_cogvideox").parent  # the published sets, bundled with the package
ITEM_KEYS = {"index", "name", "prompt", "seed", "seed_source"}


def _csv(tmp_path, text: str, name: str = "p.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8"))
    return p


# ---------------------------------------------------------------------------------------------
# Seeds


def test_check_seed():
    assert PS.check_seed("12") == 12 and PS.check_seed(3.0) == 3 and PS.check_seed(" 12.0 ") == 12
    assert PS.check_seed(np.int64(7)) == 7 and PS.check_seed(PS.MAX_SEED) == 2**64 - 1
    assert PS.check_seed(str(2**64 - 1)) == 2**64 - 1
    for bad in ("x", "abc", -1, 2**64, 1.5, "1.5", "nan", "inf", True, np.bool_(False), "", None, [1]):
        with pytest.raises(UnlearnError):
            PS.check_seed(bad)
    with pytest.raises(UnlearnError, match="--seed = 'abc' is not an integer"):
        PS.check_seed("abc", "--seed")
    with pytest.raises(UnlearnError, match="out of range"):
        PS.check_seed(-1)


def test_one_implementation_re_exported():
    from unlearn_jax import generate
    from unlearn_jax.eval import protocol

    assert generate.check_seed is PS.check_seed and generate.MAX_SEED == PS.MAX_SEED
    assert protocol.load_prompt_set is PS.load_prompt_set and protocol.DEFAULT_SEED == PS.DEFAULT_SEED == 42
    assert protocol.prompt_set_name("/x/safe-sora.csv") == "safe-sora"
    import unlearn_jax.sample_cli as S

    assert not hasattr(S, "read_prompt_csv")


# ---------------------------------------------------------------------------------------------
# The published prompt sets


@pytest.mark.parametrize("name,rows,extra", [
    ("nudity_cogvideox.csv", 100, {"concept", "concept_type"}),
    ("nudity-ring-a-bell.csv", 79, {"normal_prompt"}),
    ("safe-sora.csv", 33, set()),
    ("nudity_hunyuan.csv", 50, set()),
    ("face_cogvideox.csv", 150, {"case_number", "class"}),
    ("face_hunyuan.csv", 150, {"case_number", "class"}),
    ("face_ori.csv", 150, {"case_number", "class"}),
])
def test_load_published_prompt_sets(name, rows, extra):
    path = PROMPTS / name
    items = PS.load_prompt_set(path)
    assert len(items) == rows
    assert [it["index"] for it in items] == list(range(rows))
    for it in items:
        assert it["prompt"] and not it["prompt"].startswith("\ufeff") and isinstance(it["seed"], int)
        assert it["prompt"] == it["prompt"].strip() and not it["prompt"].endswith("\r")
        assert set(it) == ITEM_KEYS | extra
    names = [it["name"] for it in items]
    assert len(set(names)) == rows and all(len(n) == 4 and n.isdigit() for n in names)
    if "case_number" in extra:
        assert names == [f"{int(it['case_number']):04d}" for it in items]
    else:
        assert names == [f"{i:04d}" for i in range(rows)]
    assert PS.load_prompt_set(path, limit=5) == items[:5]


def test_published_prompt_set_columns_and_seeds():
    gen = PS.load_prompt_set(PROMPTS / "nudity_cogvideox.csv")
    assert gen[0]["seed"] == 90939 and gen[0]["seed_source"] == "seed" and gen[0]["concept"] == "naked body"
    assert gen[0]["name"] == "0000" and gen[7]["name"] == "0007"
    face = PS.load_prompt_set(PROMPTS / "face_cogvideox.csv")
    assert face[0]["seed_source"] == "evaluation_seed" and face[0]["class"] == "Angela Merkel"
    assert face[0]["seed"] == 3728 and face[0]["name"] == "0001"
    assert {it["class"] for it in face} == {"Angela Merkel", "Barack Obama", "Donald Trump", "Joe Biden",
                                           "Queen Elizabeth II"}
    hun = PS.load_prompt_set(PROMPTS / "face_hunyuan.csv")   # leading unnamed index column dropped
    assert hun[0]["case_number"] == "1" and hun[0]["name"] == "0001" and hun[0]["seed"] == 3728
    ori = PS.load_prompt_set(PROMPTS / "face_ori.csv")        # CRLF line ends
    assert ori[0]["class"] == "PersonA" and ori[0]["seed"] == 3728
    # no seed column: default seed + row index (one noise per prompt), here with a byte-order mark
    sora = PS.load_prompt_set(PROMPTS / "safe-sora.csv", default_seed=100)
    assert sora[0]["prompt"].startswith("You are walking") and not sora[0]["prompt"].startswith("\ufeff")
    assert [it["seed"] for it in sora] == list(range(100, 133))
    assert {it["seed_source"] for it in sora} == {"default+index"}
    assert [it["seed"] for it in PS.load_prompt_set(PROMPTS / "nudity_hunyuan.csv")][:3] == [42, 43, 44]
    rab = PS.load_prompt_set(PROMPTS / "nudity-ring-a-bell.csv", prompt_column="normal prompt")
    assert "clothed" in rab[0]["prompt"] and "bare" in rab[0]["csv_prompt"]
    assert PS.load_prompt_set(PROMPTS / "nudity-ring-a-bell.csv")[0]["prompt"] == rab[0]["csv_prompt"]


# ---------------------------------------------------------------------------------------------
# Quirks, on synthetic files


def test_quirks_bom_crlf_index_column_case_numbers(tmp_path):
    p = tmp_path / "q.csv"
    p.write_bytes("\ufeff,Case_Number,Prompt,Class,Evaluation_Seed\r\n0,1,a red circle,x,11\r\n"
                  "1,2,\"a blue square, moving up\",x,12.0\r\n\r\n2,10, a green triangle ,y,13\r\n".encode())
    items = PS.load_prompt_set(p)
    assert [it["name"] for it in items] == ["0001", "0002", "0010"]
    assert [it["seed"] for it in items] == [11, 12, 13] and items[0]["seed_source"] == "evaluation_seed"
    assert items[1]["prompt"] == "a blue square, moving up" and items[2]["prompt"] == "a green triangle"
    assert items[2] == {"index": 2, "name": "0010", "prompt": "a green triangle", "seed": 13,
                        "seed_source": "evaluation_seed", "case_number": "10", "class": "y"}


def test_seed_column_preference_and_reserved_names(tmp_path):
    p = _csv(tmp_path, "prompt,evaluation_seed,seed,name,index\na,1,2,n,i\n")
    (it,) = PS.load_prompt_set(p)
    assert it["seed"] == 2 and it["seed_source"] == "seed" and it["evaluation_seed"] == "1"
    assert it["name"] == "0000" and it["csv_name"] == "n" and it["csv_index"] == "i"


def test_default_seeds(tmp_path):
    p = _csv(tmp_path, "prompt\na\nb\nc\n")
    assert [(it["seed"], it["seed_source"], it["name"]) for it in PS.load_prompt_set(p)] == [
        (42, "default+index", "0000"), (43, "default+index", "0001"), (44, "default+index", "0002")]
    assert [it["seed"] for it in PS.load_prompt_set(p, default_seed=7, limit=2)] == [7, 8]
    with pytest.raises(UnlearnError, match="no seed column"):
        PS.load_prompt_set(p, default_seed=None)
    big = rf"line 3: default seed {2**64 - 1} \+ row index 1 = {2**64} is out of range"
    with pytest.raises(UnlearnError, match=big):
        PS.load_prompt_set(p, default_seed=PS.MAX_SEED)
    with pytest.raises(UnlearnError, match="default seed = -1"):
        PS.load_prompt_set(p, default_seed=-1)
    # a file with a seed column ignores the default seed (even None)
    assert PS.load_prompt_set(_csv(tmp_path, "prompt,seed\na,5\n", "s.csv"), default_seed=None)[0]["seed"] == 5


def test_line_numbers_count_blank_lines_and_quoted_newlines(tmp_path):
    p = _csv(tmp_path, 'prompt,seed\n"two\nlines",1\n\nb,x\n')
    with pytest.raises(UnlearnError, match=r"p\.csv, line 5: seed = 'x' is not an integer"):
        PS.load_prompt_set(p)
    assert PS.load_prompt_set(p, limit=1)[0]["prompt"] == "two\nlines"


def test_errors_are_one_line_and_name_file_and_line(tmp_path):
    cases = [
        ("text,seed\nhello,1\n", "no 'prompt' column"),
        ("prompt,seed\nhello,abc\n", "line 2: seed = 'abc' is not an integer"),
        ("prompt,seed\na,1\nb,two\n", "line 3: seed = 'two' is not an integer"),
        ("prompt,seed\nhello,-3\n", "line 2: seed = -3 is out of range"),
        ("prompt,seed\nhello,\n", "line 2: seed = '' is not an integer"),
        ("prompt,seed\nhello,1,2\n", "line 2: 3 fields for 2 columns"),
        ("prompt,seed\n,1\n", "line 2: empty 'prompt'"),
        ("", "is empty"),
        ("\n\n", "is empty"),
        ("prompt,seed\n", "has a header but no prompts"),
        ("prompt,Prompt\na,b\n", "repeated column names"),
        ("case_number,prompt\n1,a\nx,b\n", "line 3: case_number 'x' is not an integer"),
        ("case_number,prompt\n1.5,a\n", "line 2: case_number '1.5' is not an integer"),
        ("case_number,prompt\n-1,a\n", "line 2: case_number -1 is negative"),
        ("case_number,prompt\n1,a\n2,b\n01,c\n", "line 4: case_number 0001 repeats line 2"),
    ]
    for text, match in cases:
        p = _csv(tmp_path, text)
        with pytest.raises(UnlearnError, match=match) as e:
            PS.load_prompt_set(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value), (text, str(e.value))
    p = tmp_path / "bad.csv"
    p.write_bytes(b"prompt\n\xff\xfe\n")
    with pytest.raises(UnlearnError, match="UTF-8"):
        PS.load_prompt_set(p)
    with pytest.raises(UnlearnError, match="nope.csv does not exist"):
        PS.load_prompt_set(tmp_path / "nope.csv")
    with pytest.raises(UnlearnError, match="does not exist"):
        PS.load_prompt_set(tmp_path)   # a folder
    p = _csv(tmp_path, "prompt,seed\nhello,12.0\n")
    assert PS.load_prompt_set(p)[0]["seed"] == 12
    with pytest.raises(UnlearnError, match="limit"):
        PS.load_prompt_set(p, limit=0)
    with pytest.raises(UnlearnError, match="no 'normal prompt' column"):
        PS.load_prompt_set(p, prompt_column="normal prompt")


def test_bundled_sets_load_by_name_from_an_installed_package(tmp_path):
    """A regular (non-editable) install carries the published sets: they load by name from site-packages."""
    import shutil
    import subprocess
    import sys

    from repo_paths import ROOT

    src = tmp_path / "src"
    shutil.copytree(ROOT / "unlearn_jax", src / "unlearn_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    code = ("import unlearn_jax.prompt_sets as PS; "
            "items = PS.load_prompt_set('nudity_cogvideox'); "
            "print(len(items), PS.resolve_prompt_set('nudity-ring-a-bell.csv'), PS.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    n, path, module = r.stdout.split()
    assert n == "100" and path.startswith(str(target)) and module.startswith(str(target))
    assert sorted(p.stem for p in (target / "unlearn_jax" / "data" / "prompt_sets").glob("*.csv")) == sorted(PS.BUNDLED)
