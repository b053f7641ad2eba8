"""fedsup's tensor file: every dtype and shape back bit for bit, copy-on-write maps, and a reader that refuses
whatever no writer makes (it reads files that come from task processes running the user's code)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch

from fedsup.engine import tensorfile
from fedsup.engine.tensorfile import MAGIC, TensorFileError


def saved(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "state.pt") -> Path:
    path = tmp_path / name
    tensorfile.save_atomic(state, str(path))
    return path


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def test_every_dtype_and_shape_comes_back_bit_for_bit(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, dtype in tensorfile.DTYPES.items():
        raw = torch.randint(0, 256, (3, 5, 16), dtype=torch.uint8, generator=generator)
        state[f"{name}.block"] = raw.view(dtype) if dtype != torch.bool else raw % 2 == 1
    state["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    state["empty"] = torch.zeros(0, 4)
    state["strided"] = torch.arange(24.0).reshape(4, 6).T            # not contiguous
    state["param"] = torch.nn.Parameter(torch.ones(2, 2))
    state["conjugated"] = torch.tensor([1 + 2j, 3 - 1j]).conj()       # a lazy conjugate view
    state["nan"] = torch.tensor([float("nan"), float("inf"), -0.0])
    back = tensorfile.read(saved(tmp_path, state))
    assert list(back) == list(state)
    for key, value in state.items():
        expected = value.detach().resolve_conj()
        assert same_bits(back[key], expected), key
    assert not any(v.requires_grad for v in back.values())


def test_a_loaded_tensor_is_a_private_copy_on_write_map(tmp_path: Path) -> None:
    path = saved(tmp_path, {"w": torch.zeros(1000)})
    first, second = tensorfile.read(path), tensorfile.read(path)
    first["w"].add_(1)
    assert torch.equal(second["w"], torch.zeros(1000))
    assert torch.equal(tensorfile.read(path)["w"], torch.zeros(1000))  # the file is unchanged
    del second
    assert first["w"].sum().item() == 1000  # the map lives as long as its tensors


def test_tensors_start_aligned_and_the_layout_is_the_documented_one(tmp_path: Path) -> None:
    data = saved(tmp_path, {"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(2)}).read_bytes()
    assert data[:8] == MAGIC
    length = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16:16 + length])
    start = -(-(16 + length) // 64) * 64
    assert header == {"tensors": [["a", "int8", [3], 0, 3], ["b", "float32", [2], 64, 8]]}
    assert data[start:start + 3] == bytes([1, 1, 1])
    assert torch.equal(torch.frombuffer(bytearray(data[start + 64:start + 72]), dtype=torch.float32), torch.ones(2))


def test_states_the_format_cannot_hold_are_written_with_torch_save(tmp_path: Path) -> None:
    state = {"sparse": torch.eye(3).to_sparse(), "dense": torch.ones(2)}
    assert not tensorfile.supports(state)
    path = saved(tmp_path, state)
    assert not tensorfile.is_tensor_file(path)
    back = tensorfile.read_state(path)
    assert torch.equal(back["sparse"].to_dense(), torch.eye(3)) and torch.equal(back["dense"], torch.ones(2))


def test_read_state_reads_torch_save_files_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"w": torch.arange(4)}, path)
    assert torch.equal(tensorfile.read_state(path)["w"], torch.arange(4))

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("ran",))

    torch.save({"w": Evil()}, path)
    with pytest.raises(Exception, match="GLOBAL"):
        tensorfile.read_state(path)


def _file(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    body = json.dumps(header).encode()
    size = len(body) if length is None else length
    start = -(-(16 + len(body)) // 64) * 64
    return MAGIC + size.to_bytes(8, "little") + body + b"\0" * (start - 16 - len(body)) + data


@pytest.mark.parametrize(("content", "says"), [
    (b"", "not a fedsup tensor file"),
    (b"PK\x03\x04 a zip, as torch.save writes", "not a fedsup tensor file"),
    (MAGIC + (2**40).to_bytes(8, "little"), "a header of 1099511627776 bytes"),
    (MAGIC + (5).to_bytes(8, "little") + b"{not}", "damaged header"),
    (_file([1, 2]), "no list of tensors"),
    (_file({"tensors": [["w", "float32", [2], 0]]}), "an entry"),
    (_file({"tensors": [["w", "float32", [1], 0, 4], ["w", "float32", [1], 64, 4]]}, b"\0" * 68), "tensor name 'w'"),
    (_file({"tensors": [[7, "float32", [1], 0, 4]]}, b"\0" * 4), "tensor name '7'"),
    (_file({"tensors": [["w", "object", [1], 0, 8]]}, b"\0" * 8), "unknown dtype 'object'"),
    (_file({"tensors": [["w", "qint8", [1], 0, 1]]}, b"\0"), "unknown dtype 'qint8'"),
    (_file({"tensors": [["w", "float32", [-1], 0, 4]]}, b"\0" * 4), "damaged shape"),
    (_file({"tensors": [["w", "float32", [1.5], 0, 4]]}, b"\0" * 4), "damaged shape"),
    (_file({"tensors": [["w", "float32", [1] * 65, 0, 4]]}, b"\0" * 4), "damaged shape"),
    (_file({"tensors": [["w", "float32", [2], 0, 4]]}, b"\0" * 8), "damaged extent"),
    (_file({"tensors": [["w", "float32", [1], 3, 4]]}, b"\0" * 8), "damaged extent"),
    (_file({"tensors": [["w", "float32", [1], -64, 4]]}, b"\0" * 8), "damaged extent"),
    (_file({"tensors": [["w", "float32", [1], 0, 4.0]]}, b"\0" * 8), "damaged extent"),
    (_file({"tensors": [["w", "float32", [4], 0, 16]]}, b"\0" * 8), "runs past the end"),
    (_file({"tensors": [["w", "float32", [2**40], 0, 2**42]]}), "runs past the end"),
    (_file({"tensors": [["flag", "bool", [2], 0, 2]]}, b"\x01\x07"), "bytes other than 0 and 1"),
])
def test_the_reader_refuses_what_no_writer_makes(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(TensorFileError, match=says) as caught:
        tensorfile.read(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_truncated_and_flipped_files_are_refused_or_read_never_anything_else(tmp_path: Path) -> None:
    """Every prefix of a real file, and random single-byte changes, either read (a change in the data) or
    raise TensorFileError: never another exception, never a tensor past the file's end."""
    good = io.BytesIO()
    tensorfile.write({"w": torch.arange(40.0).reshape(5, 8), "b": torch.ones(3, dtype=torch.int64),
                      "m": torch.tensor([True, False])}, good)
    data = good.getvalue()
    path = tmp_path / "f.pt"
    rng = random.Random(1)
    cases = [data[:n] for n in range(len(data))]
    for _ in range(400):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        cases.append(bytes(flipped))
    outcomes = {"read": 0, "refused": 0}
    for case in cases:
        path.write_bytes(case)
        try:
            state = tensorfile.read(path)
        except TensorFileError:
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        assert sum(v.numel() * v.element_size() for v in state.values()) <= len(case)
    assert outcomes["read"] > 0 and outcomes["refused"] > len(data)  # every strict prefix is refused
