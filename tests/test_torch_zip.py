"""The torch-free .pth reader: same arrays as torch.load, and code-carrying pickles refused."""

import os
import pickle
import zipfile

import numpy as np
import pytest

from vd_jax.convert import core
from vd_jax.convert.core import CheckpointError

torch = pytest.importorskip("torch")


def test_reads_what_torch_saved(tmp_path):
    g = torch.Generator().manual_seed(0)
    wte = torch.randn(11, 6, generator=g)
    sd = {
        "a.weight": torch.randn(4, 3, 2, 2, generator=g),
        "half": torch.randn(5, 7, generator=g).half(),
        "bf16": torch.randn(3, generator=g).to(torch.bfloat16),
        "ids": torch.arange(77)[None],
        "transposed": torch.randn(6, 8, generator=g).t(),  # non-contiguous strides
        "slice": torch.randn(10, 4, generator=g)[3:7],  # storage offset
        "wte": wte,
        "lm_head": wte,  # tied: one storage, two keys
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "m.pth"
    torch.save({"state_dict": sd}, path)
    state = core.read_state_dict(path)
    assert set(state) == set(sd)
    for k, v in sd.items():
        got = state[k]
        want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        assert got.shape == tuple(v.shape), k
        np.testing.assert_array_equal(np.asarray(got, want.dtype), want, err_msg=k)
        assert state.shape(k) == tuple(v.shape)
    assert state.dtype("half") == "float16" and state.dtype("bf16") == "bfloat16"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vd_jax_zip_pwned",))


def test_code_in_a_torch_zip_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2)}, path)
    # Swap data.pkl for a pickle that would call os.system.
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps({"w": _Exploit()})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        core.read_state_dict(path)
    assert not os.path.exists("/tmp/vd_jax_zip_pwned")


def test_truncated_and_legacy_files(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"w": torch.ones(1000)}, path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth: refused or unreadable"):
        core.read_state_dict(tmp_path / "cut.pth")
    torch.save({"w": torch.ones(3)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a zip-format PyTorch file"):
        core.read_state_dict(tmp_path / "old.pth")


def test_loading_streams_one_tensor_at_a_time(tmp_path):
    """Peak memory while converting is the output plus about one tensor, not twice it."""
    import tracemalloc

    import jax

    g = torch.Generator().manual_seed(0)
    sd = {f"w{i}": torch.randn(256, 1024, generator=g) for i in range(12)}  # 12 x 1 MiB
    torch.save(sd, tmp_path / "big.pth")
    state = core.read_state_dict(tmp_path / "big.pth")
    rules = [core.Rule(f"w{i}", f"layer_{i}/kernel", "linear") for i in range(12)]
    abstract = {
        f"layer_{i}": {"kernel": jax.ShapeDtypeStruct((1024, 256), np.float32)} for i in range(12)
    }
    tracemalloc.start()
    params = core.load_params(state, rules, abstract)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    output = sum(v["kernel"].nbytes for v in params.values())
    np.testing.assert_array_equal(params["layer_3"]["kernel"], sd["w3"].numpy().T)
    assert peak < output + 3 * (1 << 20), (peak, output)
