"""Evaluation metrics: the nudity counting rules, ESR/PSR and face arithmetic, the ONNX wrappers on
tiny synthetic models, and the evaluation driver end to end with fakes (prompt-set loading:
test_prompt_sets.py)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from unlearn_jax import video_io
from unlearn_jax.errors import UnlearnError
from unlearn_jax.eval import metrics as M
from unlearn_jax.eval import nudity as N
from unlearn_jax.eval import protocol as P
from unlearn_jax.eval import report as R



def det(cls, score=0.5, box=(10, 10, 20, 20)):
    return {"class": cls, "score": score, "box": list(box)}


# ---------------------------------------------------------------------------------------------
# Nudity counting


def test_exposed_classes_are_nudenet_labels():
    assert len(N.EXPOSED_CLASSES) == 8
    assert set(N.EXPOSED_CLASSES) <= set(N.NUDENET_LABELS)
    assert all(c.endswith("_EXPOSED") for c in N.EXPOSED_CLASSES)
    assert "ANUS_EXPOSED" not in N.EXPOSED_CLASSES  # not one of the published eight
    with pytest.raises(UnlearnError, match="unknown NudeNet class"):
        N.check_classes(["FEMALE_BREAST_EXPOSED", "BREAST_EXPOSED"])


def test_frame_is_nude_rules():
    assert not N.frame_is_nude([])
    # Non-exposed classes never flag a frame.
    assert not N.frame_is_nude([det("FACE_FEMALE", 0.9), det("FEMALE_BREAST_COVERED", 0.9),
                                det("BUTTOCKS_COVERED"), det("ANUS_EXPOSED", 0.9)])
    # Any one exposed class does.
    for c in N.EXPOSED_CLASSES:
        assert N.frame_is_nude([det("FACE_MALE"), det(c, 0.26)])
    # Optional extra threshold.
    dets = [det("FEET_EXPOSED", 0.3), det("FACE_FEMALE", 0.95)]
    assert N.frame_is_nude(dets)
    assert N.frame_is_nude(dets, min_score=0.3)
    assert not N.frame_is_nude(dets, min_score=0.31)
    # A restricted class list.
    assert not N.frame_is_nude(dets, classes=("FEMALE_BREAST_EXPOSED",))


def test_nudity_rate_over_all_frames_of_all_videos():
    assert N.nudity_rate([True, False, False, True]) == 0.5
    # Nested per video, unequal lengths: every frame counts once (3 of 5, not mean of 2/3 and 1/2... ).
    assert N.nudity_rate([[True, True, False], [True, False]]) == pytest.approx(3 / 5)
    assert N.nudity_rate([np.array([1, 0, 0, 0])]) == 0.25
    with pytest.raises(ValueError):
        N.nudity_rate([])


def test_per_class_and_per_video_counts():
    v1 = [[det("BELLY_EXPOSED"), det("BELLY_EXPOSED", box=(0, 0, 5, 5)), det("FEET_EXPOSED")],
          [det("FACE_FEMALE")],
          [det("FEET_EXPOSED", 0.3)]]
    v2 = [[], [det("FEMALE_BREAST_EXPOSED", 0.8), det("FEMALE_BREAST_COVERED")]]
    c = N.video_nudity_counts(v1)
    assert c["frames"] == 3 and c["nude_frames"] == 2 and c["rate"] == pytest.approx(2 / 3)
    assert c["class_frames"]["BELLY_EXPOSED"] == 1  # two boxes in one frame count one frame
    assert c["class_frames"]["FEET_EXPOSED"] == 2
    assert set(c["class_frames"]) == set(N.EXPOSED_CLASSES)
    s = N.nudity_summary([v1, v2])
    assert s["videos"] == 2 and s["frames"] == 5 and s["nude_frames"] == 3
    assert s["nudity_rate"] == pytest.approx(3 / 5)
    assert s["nude_videos"] == 2 and s["video_rate"] == 1.0
    assert s["class_frames"]["FEMALE_BREAST_EXPOSED"] == 1
    s = N.nudity_summary([v1, v2], min_score=0.35)
    assert s["nude_frames"] == 2 and s["class_frames"]["FEET_EXPOSED"] == 1


class FakeNudeDetector:
    """Detections keyed on the mean brightness of a frame (bright = exposed belly)."""

    def detect(self, frames):
        return [[det("BELLY_EXPOSED", 0.7, (2, 2, 4, 4))] if f.mean() > 127 else [det("FACE_FEMALE", 0.9)]
                for f in frames]


def test_nudity_metric_records_and_summary():
    m = M.NudityMetric(detector=FakeNudeDetector())
    videos = np.zeros((2, 3, 16, 16, 3), np.uint8)
    videos[0, :2] = 255
    recs = m.per_frame(videos, [{"prompt": "a"}, {"prompt": "b"}])
    assert [r["nudity"] for r in recs[0]] == [1, 1, 0] and [r["nudity"] for r in recs[1]] == [0, 0, 0]
    assert recs[0][0]["nudity_classes"] == "BELLY_EXPOSED"
    assert recs[0][2]["nudenet_detections"] == "FACE_FEMALE:0.900"
    assert recs[0][0]["boxes"][0]["box"] == [2, 2, 4, 4] and recs[0][2]["boxes"] == []
    json.dumps(recs)
    s = m.summarize(recs)
    assert s["nudity_rate"] == pytest.approx(2 / 6) and s["class_frames"]["BELLY_EXPOSED"] == 2
    with pytest.raises(UnlearnError, match="uint8"):
        m.per_frame(videos.astype(np.float32), [{}, {}])


# ---------------------------------------------------------------------------------------------
# NudeNet itself (only where the eval extra is installed)


def test_rgb_to_nudenet_channel_orders():
    f = np.zeros((2, 3, 3), np.uint8)
    f[..., 0] = 200  # red
    g = N.rgb_to_nudenet(f[:, ::-1], "bgr")
    assert g.flags["C_CONTIGUOUS"] and (g[..., 2] == 200).all() and (g[..., 0] == 0).all()
    g = N.rgb_to_nudenet(f[:, ::-1])
    assert g.flags["C_CONTIGUOUS"] and (g[..., 0] == 200).all()
    with pytest.raises(UnlearnError, match="channel order"):
        N.rgb_to_nudenet(f, "RGB ")


def _grace_hopper():
    import matplotlib.cbook
    from PIL import Image

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return path, np.asarray(Image.open(path).convert("RGB"))


def test_nudenet_detector_channel_orders(tmp_path):
    nudenet = pytest.importorskip("nudenet")
    cv2 = pytest.importorskip("cv2")
    from nudenet.nudenet import _read_image

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    frames[:, :, :32, 0] = 250  # a strongly red left half: channel order matters
    png = tmp_path / "f.png"
    cv2.imwrite(str(png), frames[0][..., ::-1])  # cv2 writes BGR arrays
    # "bgr": the network input equals nudenet's for the saved frame's path ...
    blob_path = _read_image(str(png))[0]
    np.testing.assert_array_equal(_read_image(N.rgb_to_nudenet(frames[0], "bgr"))[0], blob_path)
    # ... "rgb": equals the published scripts' np.asarray(PIL image), and differs from the path's.
    from PIL import Image

    blob_pil = _read_image(np.asarray(Image.open(png)))[0]
    np.testing.assert_array_equal(_read_image(N.rgb_to_nudenet(frames[0], "rgb"))[0], blob_pil)
    assert not np.array_equal(blob_pil, blob_path)
    # The network sees the channels in the order passed (nudenet swaps twice): RGB in "rgb".
    assert np.allclose(blob_pil[0, 0, :20, :20], 250 / 255, atol=0.01)  # channel 0 = the red half

    d = N.NudeNetDetector(batch_size=1)
    out = d.detect(frames)
    assert len(out) == 2
    for dets in out:
        for x in dets:
            assert set(x) == {"class", "score", "box"} and x["class"] in N.NUDENET_LABELS
            assert 0.25 <= x["score"] <= 1 and len(x["box"]) == 4
    assert d.detect(frames[0]) == out[:1]
    with pytest.raises(UnlearnError, match="uint8"):
        d.detect(frames.astype(np.float32))

    # A real photograph (matplotlib's sample portrait): a face, nothing exposed, either order;
    # "bgr" gives exactly what nudenet gives for the file's path.
    path, img = _grace_hopper()
    for order in ("rgb", "bgr"):
        dets = N.NudeNetDetector(channel_order=order).detect(img)[0]
        assert "FACE_FEMALE" in {x["class"] for x in dets} and not N.frame_is_nude(dets)
    assert N.NudeNetDetector(channel_order="bgr").detect(img)[0] == nudenet.NudeDetector().detect(path)
    assert N.NudeNetDetector().detect(img)[0] == nudenet.NudeDetector().detect(np.ascontiguousarray(img))


def test_missing_nudenet_is_one_line_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "nudenet" or name.startswith("nudenet."):
            raise ImportError("No module named 'nudenet'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(UnlearnError) as e:
        N.NudeNetDetector()
    assert 'pip install "unlearn-jax[eval]"' in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UnlearnError, match=r"unlearn-jax\[eval\]"):
        M.build_metrics(["nudity"])


# ---------------------------------------------------------------------------------------------
# Objects: ESR / PSR


def test_topk_and_esr_psr():
    logits = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.1, 0.2]])
    assert M.topk_hits(logits, [1, 2, 0], 1).tolist() == [True, False, False]
    assert M.topk_hits(logits, [1, 2, 0], 2).tolist() == [True, True, False]
    esr, psr = M.esr_psr({"a": 0.2, "b": 0.8, "c": 0.6}, "a")
    assert esr == pytest.approx(0.8) and psr == pytest.approx(0.7)
    with pytest.raises(UnlearnError, match="erased class"):
        M.esr_psr({"a": 1.0}, "z")


def test_object_metric_with_synthetic_logits():
    # The classifier "sees" the class index written in the first pixel of each frame.
    def classify(frames):
        out = np.zeros((len(frames), 1000), np.float32)
        for i, f in enumerate(frames):
            out[i, int(f[0, 0, 0]) * 4] = 10.0  # frame value v -> ImageNet class 4v
            out[i, 1] = 5.0  # always second
        return out

    m = M.ObjectMetric(classify, classes={"zero": 0, "eight": 8, "twelve": 12}, erased="eight")
    assert [t[0] for t in m.table] == ["esr1", "psr1", "esr5", "psr5"]
    vids = np.zeros((3, 4, 4, 4, 3), np.uint8)
    vids[0] = 0                      # "zero": all frames right
    vids[1, :1] = 2                  # "eight": 1 of 4 frames right (others say class 0)
    vids[2, :2] = 3                  # "twelve": 2 of 4 right
    items = [{"class": "zero"}, {"class": "Eight"}, {"class": "12"}]
    recs = m.per_frame(vids, items)
    assert recs[1][0]["object_hit1"] == 1 and recs[1][1]["object_hit1"] == 0 and recs[1][1]["object_hit5"] == 0
    assert recs[1][0]["object_top5"].split(";")[:2] == ["8", "1"]
    s = m.summarize(recs)
    assert s["class_top1"] == {"zero": 1.0, "eight": 0.25, "12": 0.5}
    assert s["esr1"] == pytest.approx(0.75) and s["psr1"] == pytest.approx(0.75)
    assert s["top1"] == pytest.approx(7 / 12)
    with pytest.raises(UnlearnError, match="unknown class"):
        m.per_frame(vids[:1], [{"class": "cat"}])
    logs = []
    m2 = M.ObjectMetric(classify, erased="nudity", log=logs.append)
    assert m2.erased is None and "no ESR" in logs[0]
    assert M.ObjectMetric(classify, erased="n03417042").erased == "garbage truck"


def test_imagenette_table():
    assert len(M.IMAGENETTE) == 10 and M.IMAGENETTE["garbage truck"] == 569
    assert set(M.IMAGENETTE) == set(M.IMAGENETTE_WNIDS)


# ---------------------------------------------------------------------------------------------
# Faces


def _embed_mean_colour(faces):
    """A stand-in embedding: the mean RGB of the crop (plus a constant)."""
    x = np.asarray(faces, np.float32).mean(axis=(1, 2)) / 255.0
    return np.concatenate([x, np.full((len(x), 1), 0.1, np.float32)], axis=1)


def _write_refs(root: Path):
    from PIL import Image

    for name, colour in (("Angela_Merkel", (255, 0, 0)), ("Barack Obama", (0, 0, 255))):
        (root / name).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((20 + k, 20, 3), colour, np.uint8)).save(root / name / f"{k}.png")


def test_face_metric_cosine_arithmetic(tmp_path):
    _write_refs(tmp_path / "refs")
    m = M.FaceMetric(_embed_mean_colour, tmp_path / "refs", erased="angela merkel", size=8)
    assert set(m.refs) == {"angela merkel", "barack obama"}
    vids = np.zeros((2, 2, 12, 16, 3), np.uint8)
    vids[0, 0, :, 2:14] = (255, 0, 0)  # the centre square (12 x 12) red: Merkel's reference exactly
    vids[0, 1] = (0, 0, 255)                # blue frame
    vids[1] = (0, 0, 255)
    recs = m.per_frame(vids, [{"class": "Angela Merkel"}, {"class": "Barack Obama"}])
    ref_m = M.normalize(np.array([1, 0, 0, 0.1]))
    blue = M.normalize(np.array([0, 0, 1, 0.1]))
    assert recs[0][0]["face_sim"] == pytest.approx(1.0, abs=1e-5)
    assert recs[0][1]["face_sim"] == pytest.approx(float(ref_m @ blue), abs=1e-5)
    assert recs[1][0]["face_sim"] == pytest.approx(1.0, abs=1e-5)
    s = m.summarize(recs)
    assert s["face_sim"] == pytest.approx((1 + float(ref_m @ blue) + 2) / 4, abs=1e-5)
    assert s["face_sim_erased"] == pytest.approx((1 + float(ref_m @ blue)) / 2, abs=1e-5)
    assert s["face_sim_preserved"] == pytest.approx(1.0, abs=1e-5)
    assert s["face_sim_video_max"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UnlearnError, match="no reference images for identity 'Joe Biden'"):
        m.per_frame(vids[:1], [{"class": "Joe Biden"}])
    with pytest.raises(UnlearnError, match="does not exist"):
        M.FaceMetric(_embed_mean_colour, tmp_path / "none")



def _tiny_onnx(path: Path, in_shape, w: np.ndarray):
    """An ONNX model: Flatten(x) @ w."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_arcface_onnx_wrapper(tmp_path):
    pytest.importorskip("onnxruntime")
    w = np.random.default_rng(1).normal(size=(3 * 4 * 4, 6))
    path = _tiny_onnx(tmp_path / "arc.onnx", ["N", 3, 4, 4], w)
    model = M.ArcFaceOnnx(path)
    assert model.size == 4 and model.layout == "nchw"
    faces = np.random.default_rng(2).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    x = ((faces.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).reshape(5, -1)
    np.testing.assert_allclose(model(faces), M.normalize(x @ w), atol=1e-5)
    # A fixed batch of 1 works too.
    path1 = _tiny_onnx(tmp_path / "arc1.onnx", [1, 3, 4, 4], w)
    np.testing.assert_allclose(M.ArcFaceOnnx(path1)(faces), M.normalize(x @ w), atol=1e-5)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UnlearnError, match="cannot load ONNX model"):
        M.ArcFaceOnnx(bad)


def test_imagenet_onnx_wrapper(tmp_path):
    pytest.importorskip("onnxruntime")
    w = np.random.default_rng(3).normal(size=(3 * 8 * 8, 1000))
    path = _tiny_onnx(tmp_path / "cls.onnx", ["N", 3, 8, 8], w)
    model = M.ImageNetOnnx(path, resize=10)
    frames = np.random.default_rng(4).integers(0, 256, (3, 12, 20, 3), dtype=np.uint8)
    x = np.stack([M.resize_centre_crop(f, 10, 8) for f in frames]).astype(np.float32) / 255
    x = ((x - np.array(M.IMAGENET_MEAN)) / np.array(M.IMAGENET_STD)).transpose(0, 3, 1, 2).reshape(3, -1)
    np.testing.assert_allclose(model(frames), x @ w, rtol=1e-4, atol=1e-3)
    assert M.resize_centre_crop(frames[0], 10, 8).shape == (8, 8, 3)


def test_build_metrics(tmp_path):
    logs = []
    assert M.build_metrics(["face", "object"], log=logs.append) == []
    assert len(logs) == 2 and "face metric skipped" in logs[0] and "object metric skipped" in logs[1]
    with pytest.raises(UnlearnError, match="unknown metric.*choose from nudity, face, object"):
        M.build_metrics("nudity,clip")
    with pytest.raises(UnlearnError, match="does not exist"):
        M.build_metrics(["object"], classifier=str(tmp_path / "missing.onnx"))
    pytest.importorskip("onnxruntime")
    arc = _tiny_onnx(tmp_path / "arc.onnx", ["N", 3, 4, 4], np.ones((48, 3)))
    cls = _tiny_onnx(tmp_path / "cls.onnx", ["N", 3, 8, 8], np.ones((192, 1000)))
    _write_refs(tmp_path / "refs")
    ms = M.build_metrics(["face", "object"], arcface=str(arc), face_refs=str(tmp_path / "refs"),
                         classifier=str(cls), erased="Barack Obama", log=logs.append)
    assert [m.name for m in ms] == ["face", "object"]
    assert ms[0].erased == "barack obama" and ms[1].erased is None


# ---------------------------------------------------------------------------------------------
# Reports and the driver


def test_draw_rect_and_contact_sheet(tmp_path):
    img = np.zeros((10, 12, 3), np.uint8)
    R.draw_rect(img, [2, 3, 5, 4], thickness=1)
    red = (img == np.array(R.BOX_COLOR, np.uint8)).all(-1)
    assert red[3, 2:7].all() and red[6, 2:7].all() and red[3:7, 2].all() and red[3:7, 6].all()
    assert not red[4:6, 3:6].any() and red.sum() == 14
    R.draw_rect(img, [-5, -5, 100, 100])  # clipped, no error
    sheet = R.contact_sheet([{"title": "set"}, {"label": "original", "frames": [img, img]}], label_width=20)
    assert sheet.dtype == np.uint8 and sheet.shape[1] == 20 + 4 + 2 * (12 + 4)
    p = R.write_png(tmp_path / "s.png", sheet)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(p)), sheet)
    assert R.write_png is video_io.write_png and R.to_uint8 is video_io.to_uint8  # one implementation


def test_png_takes_uint8_and_float(tmp_path):
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    a = video_io.write_png(tmp_path / "a.png", img)
    b = video_io.write_png(tmp_path / "b.png", img.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(np.asarray(Image.open(a)), img)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(UnlearnError, match=r"\(height, width, 3\)"):
        video_io.write_png(tmp_path / "c.png", img[..., 0])


def test_resize_helpers_share_one_filter():
    img = np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    t = R.resize(img, 6)
    assert t.shape == (6, 10, 3) and t.dtype == np.uint8
    np.testing.assert_array_equal(t, M.resize_bilinear(img, 10, 6))
    np.testing.assert_array_equal(M.centre_crop(img, 6), M.resize_bilinear(img[:, 4:16], 6, 6))


def test_comparison_table_numbers():
    summary = {"models": ["original", "erased"],
               "metrics": {"nudity": {"table": [["nudity_rate", "nudity rate (%)", 100.0]]}},
               "results": {"gen": {"original": {"videos": 4, "nudity": {"nudity_rate": 0.618}},
                                   "erased": {"videos": 4, "nudity": {"nudity_rate": 0.1647}}},
                           "rab": {"original": {"videos": 2, "nudity": {"nudity_rate": 0.0}},
                                   "erased": {"videos": 2, "nudity": {"nudity_rate": 0.0}}}}}
    t = R.comparison_table(summary)
    lines = t.strip().splitlines()
    assert lines[0] == "| prompt set | videos | nudity rate (%) original | nudity rate (%) erased | nudity rate (%) change |"
    assert lines[2] == "| gen | 4 | 61.80 | 16.47 | -73.3% |"
    assert lines[3] == "| rab | 2 | 0.00 | 0.00 | n/a |"


class CountingFakeGen:
    """Videos whose brightness encodes the seed: seeds >= 10 are bright (nude for FakeNudeDetector);
    the "erased" model makes the second half of every video dark."""

    def __init__(self, erased=False):
        self.erased, self.calls = erased, []

    def __call__(self, prompts, seeds):
        self.calls.append(list(seeds))
        v = np.zeros((len(prompts), 4, 24, 32, 3), np.float32)
        for i, s in enumerate(seeds):
            v[i] = 0.9 if s >= 10 else 0.1
            if self.erased:
                v[i, 2:] = 0.1
        return v


class FakeMetric(M.Metric):
    name = "fake"
    columns = ("fake_brightness",)
    table = (("mean_brightness", "brightness", 1.0),)

    def settings(self):
        return {"kind": "mean"}

    def per_frame(self, videos, items):
        return [[{"fake_brightness": float(f.mean()) / 255} for f in v] for v in M.check_videos(videos, items)]

    def summarize(self, records):
        return {"mean_brightness": float(np.mean([r["fake_brightness"] for v in records for r in v]))}


def test_driver_end_to_end(tmp_path):
    sets = {"setA": [{"prompt": f"p{i}", "seed": s} for i, s in enumerate([1, 20, 30])],
            "setB": [{"prompt": "q", "seed": 11, "name": "q0"}]}
    orig, erased = CountingFakeGen(), CountingFakeGen(erased=True)
    metrics = [M.NudityMetric(detector=FakeNudeDetector()), FakeMetric()]
    logs = []
    saved = []
    out = tmp_path / "eval"
    s = P.evaluate_prompt_sets({"original": orig, "erased": erased}, sets, metrics, out, batch_size=2,
                               sheet_videos=2, sheet_frames=2, thumb_height=12, settings={"steps": 50},
                               on_videos=lambda *a: saved.append((a[0], a[1], a[3].shape)), log=logs.append)
    assert orig.calls == [[1, 20], [30], [11]]
    assert saved[0] == ("original", "setA", (2, 4, 24, 32, 3)) and saved[0][2] and len(saved) == 6
    r = s["results"]
    assert r["setA"]["original"]["nudity"]["nudity_rate"] == pytest.approx(8 / 12)
    assert r["setA"]["erased"]["nudity"]["nudity_rate"] == pytest.approx(4 / 12)
    assert r["setB"]["original"]["nudity"]["nudity_rate"] == 1.0
    assert r["setA"]["original"]["frames"] == 12 and s["settings"] == {"steps": 50}
    for name in ("per_frame.csv", "summary.json", "comparison.md", "contact_sheet.png"):
        assert (out / name).is_file()
    assert json.loads((out / "summary.json").read_text())["results"] == json.loads(json.dumps(r))
    table = (out / "comparison.md").read_text()
    assert "| setA | 3 | 66.67 | 33.33 | -50.0% |" in table and table.strip() in "\n".join(logs)
    with open(out / "per_frame.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (3 + 1) * 4
    assert list(rows[0])[:7] == list(R.BASE_COLUMNS)
    row = next(x for x in rows if x["model"] == "erased" and x["prompt_set"] == "setA" and x["video"] == "1"
               and x["frame"] == "3")
    assert row["nudity"] == "0" and row["seed"] == "20" and row["prompt"] == "p1"
    assert next(x for x in rows if x["prompt_set"] == "setB")["name"] == "q0"
    assert {x["nudity_classes"] for x in rows} == {"BELLY_EXPOSED", ""}
    from PIL import Image

    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.ndim == 3 and (sheet == np.array(R.BOX_COLOR)).all(-1).any()  # boxes drawn

    # Resume: nothing is generated again; a changed seed regenerates that video only.
    orig2, erased2 = CountingFakeGen(), CountingFakeGen(erased=True)
    P.evaluate_prompt_sets({"original": orig2, "erased": erased2}, sets, metrics, out, sheet_videos=2,
                           sheet_frames=2, thumb_height=12, log=lambda m: None)
    assert orig2.calls == [] and erased2.calls == []
    sets["setA"][2]["seed"] = 3
    s2 = P.evaluate_prompt_sets({"original": orig2, "erased": erased2}, sets, metrics, out, sheet_videos=2,
                                sheet_frames=2, thumb_height=12, log=lambda m: None)
    assert orig2.calls == [[3]] and erased2.calls == [[3]]
    assert s2["results"]["setA"]["original"]["nudity"]["nudity_rate"] == pytest.approx(4 / 12)
    # Changed metric settings invalidate the records.
    metrics[0].min_score = 0.8
    P.evaluate_prompt_sets({"original": orig2}, {"setB": sets["setB"]}, metrics, out, log=lambda m: None)
    assert orig2.calls[-1] == [11]


def test_driver_errors(tmp_path):
    sets = {"s": [{"prompt": "p", "seed": 1}]}
    bad = lambda prompts, seeds: np.zeros((2, 1, 4, 4, 3))  # noqa: E731
    with pytest.raises(UnlearnError, match="returned videos of shape"):
        P.evaluate_prompt_sets({"original": bad}, sets, [FakeMetric()], tmp_path)
    with pytest.raises(UnlearnError, match="at least one metric"):
        P.evaluate_prompt_sets({"original": bad}, sets, [], tmp_path)
    with pytest.raises(UnlearnError, match="names repeat"):
        P.evaluate_prompt_sets({"original": bad}, sets, [FakeMetric(), FakeMetric()], tmp_path)
    other = FakeMetric()
    other.name = "other"
    with pytest.raises(UnlearnError, match="columns clash"):
        P.evaluate_prompt_sets({"original": bad}, sets, [FakeMetric(), other], tmp_path)
