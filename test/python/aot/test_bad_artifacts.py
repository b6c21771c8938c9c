"""Damaged, edited or foreign artifacts raise a clear error naming the file and the problem,
before any compiled code runs."""
import hashlib
import json
import shutil

import pytest

import lowbit.aot
from lowbit.compiler.artifact_format import (ArtifactError, CorruptArtifactError, IncompatibleArtifactError,
                                             canonical_json)


@pytest.fixture
def copy(tiny_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny_artifact, dst)
    return dst


def _flip(path, where: float):
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _resign(art, edit):
    """Edit the manifest as a build elsewhere would have written it (checksum made anew)."""
    m = json.loads((art / "manifest.json").read_text())
    m.pop("manifest_sha256")
    edit(m)
    m["manifest_sha256"] = hashlib.sha256(canonical_json(m)).hexdigest()
    (art / "manifest.json").write_text(json.dumps(m))


def test_intact_copy_loads(copy):
    lowbit.aot.load(copy)


@pytest.mark.parametrize("name", ["code.so", "weights.safetensors"])
def test_truncated(copy, name):
    f = copy / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CorruptArtifactError, match=f"{name}: .* bytes, the manifest says .*truncated"):
        lowbit.aot.load(copy)


@pytest.mark.parametrize("where", [0.01, 0.5, 0.99])
def test_bit_flip_in_code(copy, where):
    _flip(copy / "code.so", where)
    with pytest.raises(CorruptArtifactError, match="code.so: sha256 mismatch"):
        lowbit.aot.load(copy)
    with pytest.raises(CorruptArtifactError, match="code.so: sha256 mismatch"):
        lowbit.aot.load(copy, verify="fast")  # the code is always verified


@pytest.mark.parametrize("where", [0.5, 0.99])
def test_bit_flip_in_weights(copy, where):
    _flip(copy / "weights.safetensors", where)
    with pytest.raises(CorruptArtifactError, match="weights.safetensors: sha256 mismatch"):
        lowbit.aot.load(copy)


def test_fast_mode_checks_the_weights_header(copy):
    f = copy / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[0:8] = (len(data) * 2).to_bytes(8, "little")  # header length beyond the file
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="weights.safetensors: header length"):
        lowbit.aot.load(copy, verify="fast")


@pytest.mark.parametrize("edit", ["flip", "truncate", "value"])
def test_edited_manifest(copy, edit):
    m = copy / "manifest.json"
    if edit == "flip":
        _flip(m, 0.5)
    elif edit == "truncate":
        m.write_text(m.read_text()[:100])
    else:
        m.write_text(m.read_text().replace('"mutable": true', '"mutable": false', 1))
    with pytest.raises(CorruptArtifactError, match="manifest.json: "):
        lowbit.aot.load(copy)


def test_missing_file(copy):
    (copy / "weights.safetensors").unlink()
    with pytest.raises(CorruptArtifactError, match="weights.safetensors: missing"):
        lowbit.aot.load(copy)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        lowbit.aot.load(tmp_path / "nothing")


@pytest.mark.parametrize("key,value", [("lowbit", "0.0.1"), ("torch", "2.0.0"), ("runtime_abi", 999)])
def test_version_mismatch(copy, key, value):
    _resign(copy, lambda m: m["versions"].__setitem__(key, value))
    with pytest.raises(IncompatibleArtifactError, match=f"built with {key}|runtime ABI 999"):
        lowbit.aot.load(copy)


def test_cpu_lacks_the_target_isa(copy):
    # An artifact built for a CPU with a feature this one does not have (a made-up flag).
    _resign(copy, lambda m: m["target"]["requires"].append("avx1024_imaginary"))
    with pytest.raises(IncompatibleArtifactError, match="lacks avx1024_imaginary"):
        lowbit.aot.load(copy)


def test_library_does_not_match_manifest(copy):
    _resign(copy, lambda m: m["entries"]["e0"].__setitem__("symbol", "lowbit_entry_999"))
    with pytest.raises(CorruptArtifactError, match="no entry symbol 'lowbit_entry_999'"):
        lowbit.aot.load(copy)


@pytest.mark.parametrize("pairs", [[[99, 0]], [[0, 99]], [["0", 0]], [[0]]])
def test_invalid_in_place_output_pairs(copy, pairs):
    """`alias_outputs` says which outputs the code updates in place (the caller passes the
    input as that buffer): out-of-range or malformed pairs are a clear error, never a call
    that writes through the wrong buffer."""
    _resign(copy, lambda m: m["entries"]["e0"].__setitem__("alias_outputs", pairs))
    with pytest.raises(CorruptArtifactError, match="alias_outputs"):
        lowbit.aot.load(copy)
