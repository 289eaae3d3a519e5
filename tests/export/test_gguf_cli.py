"""`lowbit export --format gguf` (the writer, and the --type/--method/--calib shortcut that quantizes
first) and `lowbit info FILE.gguf`, and bad input: an unknown --type, shortcut flags that conflict,
a truncated tensor, corrupted headers (a seeded fuzz), an architecture without a GGUF mapping --
each one `lowbit: error:` line, exit 2, no traceback, nothing left at --out."""
from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest
from gguf_support import read_tensors, with_merges

from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.models.gguf_names import family_for
from lowbit.models.gguf_check import check_gguf


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("lowbit: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir, tmp_path_factory):
    return with_merges(tiny_llama_dir, tmp_path_factory.mktemp("gguf_cli_llama"))


@pytest.fixture(scope="module")
def q8_file(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf_cli") / "tiny-q8_0.gguf"
    assert main(["export", str(llama_dir), "--format", "gguf", "--type", "Q8_0", "--out", str(out)]) == 0
    return out


def test_export_writes_one_file_and_info_lists_every_tensor(capsys, llama_dir, tmp_path):
    out = tmp_path / "sub" / "tiny-q4_k_m.gguf"
    code, text, _ = run(capsys, "export", llama_dir, "--format", "gguf", "--type", "Q4_K_M", "--out", out)
    assert code == 0 and out.is_file() and "bits per weight" in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-q4_k_m.gguf"]  # no temporary left over
    assert os.stat(out).st_mode & 0o044  # readable by others, as a normal file
    tensors = read_tensors(out)
    code, text, _ = run(capsys, "info", out)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.split()}
    for name, (type_name, shape, data) in tensors.items():
        assert rows[name][1] == type_name and rows[name][2] == "x".join(map(str, shape))
        assert float(rows[name][3]) == pytest.approx(8 * data.nbytes / int(np.prod(shape)))
    stored = sum(d.nbytes for _, _, d in tensors.values())
    params = sum(int(np.prod(s)) for _, s, _ in tensors.values())
    assert float(rows["bits_per_weight"][1]) == pytest.approx(8 * stored / params, rel=1e-4)
    # an existing file is refused without --overwrite (the shortcut and the plain writer alike), replaced with it
    for flags in (["--type", "Q8_0"], ["--requantize", "F16"]):
        code, _, err = run(capsys, "export", llama_dir, "--format", "gguf", *flags, "--out", out)
        assert code == 2 and "already exists" in one_error_line(err)
        assert read_tensors(out).keys() == tensors.keys()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-q4_k_m.gguf"]
    assert run(capsys, "export", llama_dir, "--format", "gguf", "--requantize", "F16", "--out", out,
               "--overwrite")[0] == 0
    assert {t for t, _, _ in read_tensors(out).values()} == {"F16", "F32"}
    # no --type: the float model as F32
    code, _, _ = run(capsys, "export", llama_dir, "--format", "gguf", "--out", out, "--overwrite")
    assert code == 0 and {t for t, _, _ in read_tensors(out).values()} == {"F32"}


def test_unknown_type_is_one_line_listing_the_known_types(capsys, llama_dir, tmp_path):
    out = tmp_path / "x.gguf"
    code, _, err = run(capsys, "export", llama_dir, "--format", "gguf", "--type", "Q4_K_X", "--out", out)
    line = one_error_line(err)
    assert code == 2 and "Q4_K_X" in line and "Q4_K_M" in line and "F32" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_family_without_mapping_is_one_line():
    with pytest.raises(LowbitError, match="no GGUF mapping for family phi3"):
        family_for("phi3")


def test_truncated_tensor_is_one_line_in_info_and_eval(capsys, q8_file, tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(q8_file.read_bytes()[:-100])
    code, _, err = run(capsys, "info", bad)
    assert code == 2 and "truncated" in one_error_line(err)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    code, _, err = run(capsys, "eval", bad, "--text", text, "--ctx", 16, "--windows", 1)
    assert code == 2 and "truncated" in one_error_line(err)


def test_corrupted_magic_is_one_line_in_eval(capsys, q8_file, tmp_path):
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + q8_file.read_bytes()[4:])
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    code, _, err = run(capsys, "eval", bad, "--text", text, "--ctx", 16, "--windows", 1)
    assert code == 2 and "magic" in one_error_line(err)


def test_fuzzed_headers_give_one_line_or_a_valid_file(capsys, q8_file, tmp_path):
    """Random byte changes in the header (counts, lengths, types, shapes, offsets): `lowbit info`
    either reads a file that passes the structural check or says what is wrong in one line."""
    data = q8_file.read_bytes()
    header_end = data.index(b"output_norm.weight") + 64  # past the key/values and into the tensor infos
    rng = random.Random(0)
    outcomes = {0: 0, 2: 0}
    for i in range(60):
        mutated = bytearray(data)
        for _ in range(rng.choice((1, 2, 4))):
            at = rng.randrange(4, header_end)
            mutated[at] = rng.choice((0x00, 0xFF, 0x7F, mutated[at] ^ (1 << rng.randrange(8))))
        path = tmp_path / f"fuzz{i}.gguf"
        path.write_bytes(bytes(mutated))
        start = time.perf_counter()
        code, _, err = run(capsys, "info", path)
        assert time.perf_counter() - start < 10, f"mutation {i} took too long"
        assert code in (0, 2), err
        if code == 2:
            assert "not a valid GGUF file" in one_error_line(err)
        else:
            check_gguf(path)
        outcomes[code] += 1
        path.unlink()
    assert outcomes[2] >= 10  # the fuzz does reach the checks


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    text = tmp_path_factory.mktemp("gguf_cli_calib") / "calib.txt"
    text.write_text("the cat sat on the mat and then it went home. a dog ran by the river at noon. " * 60)
    return text


def test_export_shortcut_is_quantize_then_write(capsys, llama_dir, calib_text, tmp_path):
    """`lowbit export MODEL --format gguf --type MIX --method M --calib C` writes the same bytes as
    `lowbit quantize` with those flags followed by `lowbit export DIR`; --calib alone means imatrix."""
    calib = ["--calib", calib_text, "--samples", 4, "--seq-len", 64]
    shortcut, direct, dir_ = tmp_path / "s.gguf", tmp_path / "d.gguf", tmp_path / "q"
    assert run(capsys, "export", llama_dir, "--format", "gguf", "--type", "Q4_K_M", "--method", "gptq", *calib,
               "--out", shortcut)[0] == 0
    assert run(capsys, "quantize", llama_dir, "--format", "gguf", "--type", "Q4_K_M", "--method", "gptq", *calib,
               "--out", dir_)[0] == 0
    assert run(capsys, "export", dir_, "--format", "gguf", "--out", direct)[0] == 0
    a, b = read_tensors(shortcut), read_tensors(direct)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0] and np.array_equal(np.array(a[name][2]), np.array(b[name][2])), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gguf", "q", "s.gguf"]  # the temporary is gone
    imatrix, plain = tmp_path / "i.gguf", tmp_path / "p.gguf"
    assert run(capsys, "export", llama_dir, "--format", "gguf", "--type", "Q4_K_M", *calib, "--out", imatrix)[0] == 0
    assert run(capsys, "export", llama_dir, "--format", "gguf", "--type", "Q4_K_M", "--out", plain)[0] == 0
    i, p = read_tensors(imatrix), read_tensors(plain)
    assert {n: t for n, (t, _, _) in i.items()} == {n: t for n, (t, _, _) in p.items()}   # the same mix
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_up.weight"):
        assert not np.array_equal(np.array(i[name][2]), np.array(p[name][2])), name     # the imatrix searched
        assert not np.array_equal(np.array(i[name][2]), np.array(a[name][2])), name     # GPTQ differs again
    assert np.array_equal(np.array(i["token_embd.weight"][2]), np.array(p["token_embd.weight"][2]))  # no stats


@pytest.mark.parametrize("flags, needles", [
    (["--type", "Q4_K_M", "--method", "gptq"], ["needs --calib"]),
    (["--method", "gptq", "--calib", "TEXT"], ["--type"]),
    (["--type", "Q4_K_M", "--requantize", "Q8_0"], ["--requantize"]),
    (["--type", "Q4_K_M", "--method", "shrink", "--calib", "TEXT"], ["shrink"]),
    (["--requantize", "Q4_K_X"], ["Q4_K_X", "Q4_K_M"]),
])
def test_bad_export_flags_are_one_line(capsys, llama_dir, calib_text, tmp_path, flags, needles):
    out = tmp_path / "files" / "out.gguf"
    out.parent.mkdir()
    flags = [calib_text if f == "TEXT" else f for f in flags]
    code, _, err = run(capsys, "export", llama_dir, "--format", "gguf", *flags, "--out", out)
    line = one_error_line(err)
    assert code == 2 and all(n in line for n in needles), line
    assert list(out.parent.iterdir()) == []
