"""Bad data (issue 11, items 6-7): decompression bombs and over-limit images are bad records (skipped
and counted with --on-error skip), checked from the header before any decoding, with the one pixel
limit ckd_common.data.MAX_IMAGE_PIXELS; every malformed record or data file is a one-line error naming
the file and the record; image paths outside --images are refused unless allowed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from badimages import write_bomb, write_over_limit
from ckd_common.data import MAX_IMAGE_PIXELS, DataError, Preparer, load_image, read_records


@pytest.fixture(scope="module")
def student_dir(tiny_models):
    return tiny_models["tiny-student"]


@pytest.fixture(scope="module")
def preparer_args(student_dir):
    from ckd_common.model import data_contract

    info, tok = data_contract(student_dir)
    return tok, "qwen2_base", info.num_visual_tokens, info.image_token_id


def _rec(sid, image="ok.png", answer="red"):
    rec = {"id": sid, "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                        {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "ok.png")
    write_bomb(d / "bomb.png")
    write_over_limit(d / "big.png", MAX_IMAGE_PIXELS)
    return d


def test_the_bomb_is_the_issues_bomb(images):
    assert (images / "bomb.png").stat().st_size < 60_000
    with pytest.raises(Image.DecompressionBombError):  # what crashed preparation and fills before
        Image.open(images / "bomb.png")
    with Image.open(images / "big.png") as im:  # PIL alone would decode this one
        assert im.size[0] * im.size[1] > MAX_IMAGE_PIXELS


@pytest.mark.parametrize("name", ["bomb.png", "big.png"])
def test_over_limit_images_are_data_errors_before_decoding(name, images, preparer_args):
    prep = Preparer(*preparer_args, images)
    with pytest.raises(DataError, match="more pixels than the limit|more than the limit") as e:
        prep.prepare(_rec("s", name))
    assert e.value.reason == "image over the pixel limit" and e.value.sample == "s"
    with pytest.raises(DataError, match="than the limit"):  # the loaders refuse it too, from the header
        load_image(images / name, "s")
    # a lower limit (a server's) applies the same way
    with pytest.raises(DataError, match="more than the limit of 1000"):
        Preparer(*preparer_args, images, max_image_pixels=1000).prepare(_rec("s"))


def test_bombs_are_skipped_and_counted(images, preparer_args):
    prep = Preparer(*preparer_args, images)
    ds = prep.prepare_all([_rec("a"), _rec("b", "bomb.png"), _rec("c", "big.png"), _rec("d")], on_error="skip")
    assert len(ds) == 2 and ds.skipped == {"image over the pixel limit": 2}


def test_outside_images_are_refused_unless_allowed(images, tmp_path, preparer_args):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "x.png")
    (images / "link.png").symlink_to(outside / "x.png")
    (images / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(images / "sub" / "y.png")
    (images / "inner.png").symlink_to(images / "sub" / "y.png")
    strict, lax = Preparer(*preparer_args, images), Preparer(*preparer_args, images, allow_outside_images=True)
    for path in (str(outside / "x.png"), "../elsewhere/x.png", "link.png", "sub/../../elsewhere/x.png"):
        with pytest.raises(DataError, match="resolves outside --images .*--allow-outside-images") as e:
            strict.prepare(_rec("s", path))
        assert e.value.reason == "image outside --images"
        assert lax.prepare(_rec("s", path)).has_image
    for path in ("sub/y.png", "sub/../ok.png", "inner.png"):  # inside, however spelled
        assert strict.prepare(_rec("s", path)).has_image


def _write(tmp_path, name, content) -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


DEEP = "[" * 100_000 + "]" * 100_000
GOOD = json.dumps(_rec("good"))
BAD_FILES = [
    ("not-objects.json", json.dumps([_rec("good"), [1, 2], "text"]), "not-objects.json: record 1: expected a JSON object"),
    ("int-image.json", json.dumps([_rec("good"), _rec("n7", 7)]),
     "int-image.json: record 1 \\(id n7\\): 'image' must be a path \\(a string\\) relative to --images, got int"),
    ("list-image.json", json.dumps([_rec("l1", ["ok.png", "ok.png"])]),
     "list-image.json: record 0 \\(id l1\\): 'image' must be .*got list; exactly one image per sample"),
    ("latin1.json", json.dumps([_rec("caf\u00e9")], ensure_ascii=False).encode("latin-1"),
     "latin1.json is not UTF-8 text \\(byte 0xe9 at offset \\d+\\)"),
    ("deep.json", "[" + GOOD + ", " + DEEP + "]", "deep.json: record 1: JSON nested too deeply"),
    ("deep.jsonl", GOOD + "\n" + DEEP + "\n", "deep.jsonl: line 2: JSON nested too deeply"),
    ("broken.jsonl", GOOD + "\n{\"id\": \n", "broken.jsonl: line 2 is not valid JSON"),
    ("bomb.json", json.dumps([_rec("good"), _rec("b", "bomb.png")]),
     "bomb.json: record 1 \\(id b\\): image .*bomb.png has more pixels than the limit of 33554432"),
    ("outside.json", json.dumps([_rec("o", "../secret.png")]),
     "outside.json: record 0 \\(id o\\): image '../secret.png' resolves outside --images"),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_every_bad_record_kind_is_one_line_naming_file_and_record(name, content, message, images, tmp_path,
                                                                  student_dir, capsys):
    """`ckd data prepare` on each kind of bad data: exit 2, exactly one line on stderr naming the file and
    the record, no traceback (before: AttributeError, TypeError, UnicodeDecodeError, RecursionError,
    DecompressionBombError)."""
    import re

    from ckd_common.cli import main

    data = _write(tmp_path, name, content)
    rc = main(["data", "prepare", "--model", str(student_dir), "--data", str(data), "--images", str(images),
               "--template", "qwen2_base", "--root", str(tmp_path / "root"), "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err
    last = [ln for ln in err.splitlines() if ln.startswith("ckd: error:")]
    assert rc == 2 and len(last) == 1, err
    assert re.search(message, last[0]), last[0]
    assert "Traceback" not in err


def test_read_records_names_the_file(tmp_path):
    p = _write(tmp_path, "x.json", b"\xff\xfe[]")
    with pytest.raises(DataError, match="x.json is not UTF-8 text"):
        read_records(p)
    assert read_records(_write(tmp_path, "bom.json", "\ufeff[]".encode())) == []  # a BOM is fine


@pytest.mark.integration  # a real `ckd data prepare` process: the command a user runs
def test_ckd_data_prepare_skips_bombs_with_a_count(images, tmp_path, student_dir):
    recs = [_rec("a"), _rec("b", "bomb.png"), _rec("c", "big.png"), _rec("d", answer="blue")]
    data = _write(tmp_path, "d.json", json.dumps(recs))
    cmd = [sys.executable, "-m", "ckd_common", "data", "prepare", "--model", str(student_dir), "--data", str(data),
           "--images", str(images), "--template", "qwen2_base", "--root", str(tmp_path / "root"), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(cmd + ["--on-error", "skip"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 samples" in r.stdout and "skipped 2: image over the pixel limit" in r.stdout
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"ckd: error: {data}: record 1 (id b): image ")


@pytest.mark.parametrize("text", ["[]", " [ ] \n", json.dumps([_rec("a"), _rec("b")], indent=2),
                                  '[{"id": "x", "v": [1, {"a": "]"}]}, "s,]", 3.5, null]\r\n'])
def test_the_streaming_reader_reads_what_json_reads(text, tmp_path):
    assert read_records(_write(tmp_path, "d.json", text)) == json.loads(text)


@pytest.mark.parametrize("text,message", [("[1,]", "not valid JSON"), ("[1] x", "extra data after the list"),
                                          ("[1 2]", "expected ',' or ']' after record 0"), ("[1,", "not valid JSON"),
                                          ("", "not valid JSON"), ('"a"', "expected a JSON list of samples, got str")])
def test_the_streaming_reader_refuses_what_json_refuses(text, message, tmp_path):
    with pytest.raises(DataError, match=f"d.json.*{message}"):
        read_records(_write(tmp_path, "d.json", text))


def test_the_fill_takes_the_lowest_pixel_limit_its_servers_report():
    """One limit for preparation and servers: a server's own (``max_image_pixels`` in /v1/info) when it
    reports a lower one, ours when it reports none (servers before the field) or a higher one."""
    from types import SimpleNamespace

    from deploy.fill import server_pixel_limit

    assert server_pixel_limit({"a": SimpleNamespace()}) == MAX_IMAGE_PIXELS
    assert server_pixel_limit({"a": SimpleNamespace(max_image_pixels=None)}) == MAX_IMAGE_PIXELS
    assert server_pixel_limit({"a": SimpleNamespace(max_image_pixels=MAX_IMAGE_PIXELS * 4)}) == MAX_IMAGE_PIXELS
    assert server_pixel_limit({"a": SimpleNamespace(max_image_pixels=1 << 20),
                               "b": SimpleNamespace(max_image_pixels=1 << 22)}) == 1 << 20
