"""Several processes (issue 12): ``torchrun`` and ``--nproc`` for certify and train.

The processes share the images (certify) or every batch (train) over gloo on the CPU;
the results are those of one process. The end-to-end tests start real processes
(torchrun, as docs/distributed.md documents it, and ``--nproc``) on the bundled sample.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lirpa_patch
from lirpa_patch import distributed
from lirpa_patch.data import load_dataset
from lirpa_patch.engine import certify
from lirpa_patch.models import image_model, load_model
from lirpa_patch_cli import launch
from lirpa_patch_cli.main import app
from tests.certificates import assert_same_certificates, logit_scales

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = ROOT / "onnx_models" / "mnist_mlp_2x2.onnx"
TIMING = {"seconds", "images_per_second"}
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", launch.LAUNCHER_ENV)


# --------------------------------------------------------------------------- sharding and merging


@pytest.mark.parametrize("n", [0, 1, 5, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_item_once_in_order_and_balanced(n, world):
    parts = [distributed.shard(n, rank, world) for rank in range(world)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.fixture(scope="module")
def mnist():
    data = load_dataset("sample:train", start=4000, num=24)
    net = image_model(load_model(str(MODEL)), image_shape=tuple(data.images.shape[1:]))
    return SimpleNamespace(images=data.images, labels=data.labels, net=net, indices=data.indices.tolist(),
                           scales=logit_scales(net, data.images, data.indices.tolist()))


@pytest.mark.parametrize("groups, keep", [(None, False), (2, False), (None, True)])
def test_certifying_blocks_of_images_and_merging_gives_one_call(mnist, groups, keep):
    kwargs = dict(size=2, groups=groups, keep_location_margins=keep)
    whole = certify(mnist.net, mnist.images, mnist.labels, indices=mnist.indices, **kwargs)
    parts = []
    for rank in range(3):
        block = distributed.shard(len(mnist.labels), rank, 3)
        parts.append(certify(mnist.net, mnist.images[block], mnist.labels[block], indices=mnist.indices[block],
                             **kwargs))
    merged = distributed.merge(parts, seconds=1.0)
    # other blocks of rows: the same certificates up to BLAS rounding (lirpa_patch.tolerance), with the
    # per-location margins of the heatmaps when kept
    assert_same_certificates(merged, whole, "3 blocks merged vs one call", mnist.scales)
    if not keep:
        assert merged.location_margins is None
    assert merged.seconds == 1.0 and merged.chunk_size == whole.chunk_size and merged.head == whole.head
    if groups:
        assert merged.extra["location_groups"] == whole.extra["location_groups"]


def test_merging_adds_location_group_counts_and_counts_blocks_certified_without_groups(mnist):
    def result(images: int, groups):
        base = certify(mnist.net, mnist.images[:images], mnist.labels[:images], size=2, groups=None)
        extra = {} if groups is None else {"location_groups": groups}
        return replace(base, extra=extra)

    with_groups = result(3, {"block": 2, "images": 3, "rows_bounded": 900, "rows_per_location": 2187})
    plain = result(2, None)
    merged = distributed.merge([with_groups, plain]).extra["location_groups"]
    rows = plain.num_correct * plain.num_locations
    assert merged == {"block": 2, "images": 3, "rows_bounded": 900 + rows, "rows_per_location": 2187 + rows}
    assert distributed.merge([plain, plain]).extra == {}


def test_merging_adds_up_what_each_method_of_the_cascade_settled(mnist):
    kwargs = dict(size=2, method="crown", intermediate="crown", exhaustive=True)
    whole = certify(mnist.net, mnist.images[:6], mnist.labels[:6], **kwargs)
    parts = [certify(mnist.net, mnist.images[s], mnist.labels[s], **kwargs) for s in (slice(0, 4), slice(4, 6))]
    merged = distributed.merge(parts).extra["cascade"]
    expected = whole.extra["cascade"]
    for method in ("ibp", "crown"):
        for key in ("rows", "settled"):
            assert merged["stages"][method][key] == expected["stages"][method][key]
        assert merged["stages"][method]["seconds"] == pytest.approx(
            sum(p.extra["cascade"]["stages"][method]["seconds"] for p in parts))
    assert merged["rows_uncertified"] == expected["rows_uncertified"]
    assert merged["intermediate"] == "crown"


def test_merged_cascade_says_mixed_when_blocks_bounded_hidden_layers_differently():
    block = {"methods": ["ibp", "crown"], "intermediate": "crown", "probe": {"share": 1.0},
             "stages": {"ibp": {"rows": 2, "settled": 1, "seconds": 1.0, "chunk": 8},
                        "crown": {"rows": 1, "settled": 1, "seconds": 2.0, "chunk": 4}},
             "rows_uncertified": 0, "rows_skipped": 0}
    other = {**block, "intermediate": "ibp", "probe": {"share": 0.9}}
    merged = distributed.merge_cascades([block, other])
    assert merged["intermediate"] == "mixed" and merged["probes"] == [block["probe"], other["probe"]]
    assert merged["stages"]["crown"] == {"rows": 2, "settled": 2, "seconds": 4.0, "chunk": 4}


def test_one_process_certify_is_the_engine(mnist):
    assert distributed.current() is None and distributed.init("cpu") is None
    ours = distributed.certify(mnist.net, mnist.images[:4], mnist.labels[:4], size=2)
    theirs = certify(mnist.net, mnist.images[:4], mnist.labels[:4], size=2)
    assert [r.to_dict() for r in ours.images] == [r.to_dict() for r in theirs.images]


def test_an_error_becomes_one_line_for_the_other_ranks():
    assert distributed.outcome_of(error=lirpa_patch.UsageError("bad\nsecond line", param="x")).message == "bad"
    assert distributed.outcome_of(error=lirpa_patch.UsageError("bad")).usage
    assert distributed.outcome_of(error=MemoryError()).message == "out of memory"
    outcomes = [distributed.outcome_of(1), distributed.outcome_of(error=lirpa_patch.DataError("broken image"))]
    with pytest.raises(distributed.PeerFailed, match="rank 1 of 2 failed: broken image") as failed:
        distributed.raise_failures(outcomes)
    assert failed.value.rank == 1 and not failed.value.usage
    distributed.raise_failures([distributed.outcome_of(1), distributed.outcome_of(2)])  # nothing failed


# --------------------------------------------------------------------------- torchrun's command line


def _torchrun_args(argv: list[str]):
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(argv)


def _one_value(option) -> list[str]:
    if option.is_flag:
        return []
    if option.nargs != 1:  # pragma: no cover - no such option today
        return ["1"] * option.nargs
    return ["1"]


@pytest.mark.parametrize("command", ["certify", "train", "attack", "evaluate"])
def test_every_option_reaches_lirpa_patch_under_the_documented_torchrun_command(command):
    """torchrun's parser takes an option that abbreviates one of its own (``--start`` for
    ``--start-method``) even after the script, unless ``--`` ends torchrun's options."""
    cmd = app.commands[command]
    for option in cmd.params:
        if not isinstance(option, click.Option) or option.name == "help":
            continue
        for name in [*option.opts, *option.secondary_opts]:
            ours = [command, name, *_one_value(option)]
            args = _torchrun_args(["--nproc-per-node", "2", "--", "/venv/bin/lirpa-patch", *ours])
            assert args.training_script == "/venv/bin/lirpa-patch" and args.training_script_args == ours, name


def test_the_documented_torchrun_commands_pass_every_argument_to_lirpa_patch():
    text = (ROOT / "docs" / "distributed.md").read_text()
    commands = [" ".join(line.rstrip("\\").strip() for line in block.splitlines())
                for block in re.findall(r"^(torchrun .*?(?:\\\n.*?)*)$", text, flags=re.M)]
    assert len(commands) >= 3
    for command in commands:
        words = command.replace('"$(command -v lirpa-patch)"', "/venv/bin/lirpa-patch").split()[1:]
        args = _torchrun_args(words)
        assert args.training_script == "/venv/bin/lirpa-patch", command
        assert args.training_script_args == words[words.index("/venv/bin/lirpa-patch") + 1:], command


@pytest.mark.parametrize("command", ["attack", "evaluate"])
def test_commands_that_do_not_split_their_images_refuse_several_processes(command, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, [command, str(MODEL)])
    assert result.exit_code == 2 and f"{command} runs in one process" in result.stderr


def test_nproc_under_torchrun_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, ["certify", str(MODEL), "--nproc", "2"])
    assert result.exit_code == 2 and "torchrun" in result.stderr and "--nproc" in result.stderr


def test_the_launcher_names_a_killed_rank_and_only_then(capsys):
    fail = lambda code, t=0: SimpleNamespace(exitcode=code, timestamp=t)  # noqa: E731
    launch.err_console.quiet = False
    assert launch._failed({1: fail(-signal.SIGKILL), 0: fail(-signal.SIGTERM, 1)}, 2) == 1
    assert "rank 1 of 2 was killed by SIGKILL (out of memory?)" in capsys.readouterr().err
    assert launch._failed({1: fail(2), 0: fail(-signal.SIGTERM, 1)}, 2) == 2  # rank 1 printed its line
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- processes


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["OMP_NUM_THREADS"] = "1"  # one thread per process, in the one-process runs too
    return env


def _run(args: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=timeout)
    return result


def _lirpa(*args) -> list:
    return [BIN / "lirpa-patch", *args]


def _torchrun(*args) -> list:
    """The documented command: ``torchrun --nproc-per-node 2 -- "$(command -v lirpa-patch)" ...``."""
    return [BIN / "torchrun", "--nproc-per-node", "2", "--", BIN / "lirpa-patch", *args]


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def _without(report: dict, keys=TIMING | {"world_size"}) -> dict:
    summary = {k: v for k, v in report["summary"].items() if k not in keys}
    if summary.get("cascade"):  # each method's seconds and the timed probe of intermediate="auto"
        cascade = {k: v for k, v in summary["cascade"].items() if k not in ("probe", "probes")}
        cascade["stages"] = {m: {k: v for k, v in st.items() if k != "seconds"} for m, st in cascade["stages"].items()}
        summary["cascade"] = cascade
    return {**report, "summary": summary}


def _sample_scales(num: int, start: int = 4000) -> dict[int, float]:
    """Each image's largest |logit| (the scale of the tolerance) for reports of the bundled sample."""
    data = load_dataset("sample:train", start=start, num=num)
    net = image_model(load_model(str(MODEL)), image_shape=tuple(data.images.shape[1:]))
    return logit_scales(net, data.images, data.indices.tolist())


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_certify_in_two_processes_writes_the_report_of_one(tmp_path, method):
    args = ["certify", MODEL, "--data", "sample:train", "--start", "4000", "--num", "8", "--quiet", "--method", method]
    _ok(_run(_lirpa(*args, "-o", "one.json"), tmp_path))
    two = _run(_torchrun(*args, "-o", "two.json"), tmp_path)
    _ok(two)
    one, two_report = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert one["summary"]["world_size"] == 1 and two_report["summary"]["world_size"] == 2
    # up to BLAS rounding (lirpa_patch.tolerance), every other field exact
    assert_same_certificates(_without(two_report), _without(one), "two processes vs one", _sample_scales(8))
    assert two.stdout.count("Certified accuracy") == 1  # rank 0 alone prints


def _overflow_model(root: Path) -> tuple[Path, Path]:
    """A TorchScript model whose logits overflow on one bright digit (image 3), and 6 digits:
    the first three dim (ranks 0 of 2), the last three as they are (rank 1)."""
    data = load_dataset("sample", num=6)
    x = data.images.clone()
    x[:3] *= 0.02
    weights = (x[3].flatten() > 0.3).float() * 2 - 1  # random images: a negative sum, image 3: ~100

    class Overflow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(784, 10)
            self.register_buffer("w", weights.unsqueeze(1))

        def forward(self, images):
            flat = images.flatten(1)
            return self.linear(flat) + torch.exp(flat @ self.w)

    model = root / "overflow.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; TorchScript files are still models
        torch.jit.trace(Overflow().eval(), torch.zeros(1, 1, 28, 28)).save(str(model))
    npz = root / "mixed.npz"
    np.savez(npz, x=(x[:, 0] * 255).round().to(torch.uint8).numpy(), y=data.labels.numpy())
    return model, npz


def test_a_failing_rank_stops_the_job_with_one_line_naming_it_and_no_report(tmp_path):
    model, npz = _overflow_model(tmp_path)
    report = tmp_path / "report.json"
    report.write_text("the previous report\n")
    args = ["certify", model, "--input-shape", "1x28x28", "--data", npz, "-o", report]
    _ok(_run(_lirpa(*args, "--num", "3", "-o", tmp_path / "first3.json"), tmp_path))  # rank 0's images are fine
    result = _run(_lirpa(*args, "--nproc", "2"), tmp_path)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["Error: rank 1 of 2: the model produced NaN or infinite logits on the input images"], result.stderr
    assert result.stdout == ""
    assert report.read_text() == "the previous report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first3.json", "mixed.npz", "overflow.pt", "report.json"]


TRAIN = ["train", "--data", "sample", "--num", "240", "--val-size", "40", "--batch-size", "60", "--eval-images", "40",
         "--warmup-start", "1", "--quiet"]  # the preset's schedule (not scaled to --epochs): epoch 1 natural, 2 robust


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch on 200 bundled digits: in one process, and in two (torchrun)."""
    root = tmp_path_factory.mktemp("train")
    _ok(_run(_lirpa(*TRAIN, "--epochs", "1", "--out", "one/m.onnx"), root))
    two = _run(_torchrun(*TRAIN, "--epochs", "1", "--out", "two/m.onnx"), root)
    _ok(two)
    return SimpleNamespace(root=root, two=two)


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_training_in_two_processes_gives_the_model_of_one(trained):
    one, two = (_metrics(trained.root / d / "m.metrics.jsonl") for d in ("one", "two"))
    assert [m["kind"] for m in two] == [m["kind"] for m in one] == ["epoch", "final"]
    for a, b in zip(one, two):
        for key in ("loss", "natural_loss", "train_accuracy"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
        for key in ("val_images", "val_clean_accuracy", "val_certified_accuracy"):
            assert b[key] == a[key], key
    w1, w2 = (_weights(trained.root / d / "m.ckpt.pt") for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-6)
    assert trained.two.stdout.count("Wrote") == 1
    assert sorted(p.name for p in (trained.root / "two").iterdir()) == ["m.ckpt.pt", "m.metrics.jsonl", "m.onnx"]


def test_resume_under_torchrun_continues_exactly(trained):
    """Epoch 2 is robust training (random locations, per-rank draws): resumed or straight, the same."""
    root = trained.root
    resumed = _run(_lirpa(*TRAIN, "--nproc", "2", "--epochs", "2", "--out", "two/m.onnx",
                          "--resume", "two/m.ckpt.pt"), root)
    _ok(resumed)
    _ok(_run(_torchrun(*TRAIN, "--epochs", "2", "--out", "straight/m.onnx"), root))
    a, b = _weights(root / "two" / "m.ckpt.pt"), _weights(root / "straight" / "m.ckpt.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    epochs = [m for m in _metrics(root / "two" / "m.metrics.jsonl") if m["kind"] == "epoch"]
    straight = [m for m in _metrics(root / "straight" / "m.metrics.jsonl") if m["kind"] == "epoch"]
    assert [m["epoch"] for m in epochs] == [1, 2] and epochs[-1]["strength"] > 0
    assert epochs[-1]["loss"] == straight[-1]["loss"] and epochs[-1]["rows"] == straight[-1]["rows"]


# --------------------------------------------------------------------------- GPUs


@pytest.mark.gpu
def test_cuda_certify_matches_the_cpu_and_sizes_chunks_from_free_gpu_memory(tmp_path):
    args = ["certify", MODEL, "--data", "sample:train", "--start", "4000", "--num", "8", "--quiet"]
    _ok(_run(_lirpa(*args, "-o", "cpu.json"), tmp_path))
    _ok(_run(_lirpa(*args, "--device", "cuda", "-o", "gpu.json"), tmp_path))
    cpu, gpu = (json.loads((tmp_path / n).read_text()) for n in ("cpu.json", "gpu.json"))
    assert [i["certified"] for i in gpu["images"]] == [i["certified"] for i in cpu["images"]]
    for a, b in zip(cpu["images"], gpu["images"]):
        if a["worst_margin"] is not None:
            assert b["worst_margin"] == pytest.approx(a["worst_margin"], abs=1e-3)
    from lirpa_patch.devices import memory_budget

    assert memory_budget("cuda") > 0 and gpu["summary"]["device"] == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_with_nccl_give_the_report_of_one(tmp_path):
    args = ["certify", MODEL, "--data", "sample:train", "--start", "4000", "--num", "8", "--quiet", "--device", "cuda"]
    _ok(_run(_lirpa(*args, "-o", "one.json"), tmp_path))
    _ok(_run(_lirpa(*args, "--nproc", "2", "-o", "two.json"), tmp_path))
    one, two = (json.loads((tmp_path / n).read_text()) for n in ("one.json", "two.json"))
    assert_same_certificates(_without(two), _without(one), "two GPUs vs one", _sample_scales(8))


# --------------------------------------------------------------------------- leaving the job

_SHUTDOWN_SCRIPT = '''
import atexit, ctypes, os, sys, time
atexit.register(ctypes.PyDLL(None).usleep, 1_500_000)  # first registered, last run: keeps the GIL (PyDLL)
import torch, torch.distributed as dist
from lirpa_patch import distributed
from lirpa_patch.models.adapter import ImageModel
from lirpa_patch.models.architectures import build_architecture
from lirpa_patch.train import Trainer, TrainConfig

group = distributed.init("cpu")
torch.manual_seed(0)
images, labels = torch.rand(8, 1, 8, 8), torch.arange(8) % 2
model = ImageModel(build_architecture("mlp", 1, (8, 8), 2, width=8), image_shape=(1, 8, 8))
config = TrainConfig(patch="2x2", strategy="random", patches=1, epochs=1, warmup_start=1, warmup=0, batch_size=8,
                     eval_every=0, seed=0)
trainer = Trainer(model, config, images, labels)
trainer.fit()  # its DistributedDataParallel wrapper holds the process group
if group.rank == 0:  # a gloo worker that drops a tensor of Python's late: a collective rank 1 joins 0.5 s later
    tensor = torch.ones(1000)
    dist.all_reduce(tensor, async_op=True)
    del tensor
else:
    time.sleep(0.5)
    dist.all_reduce(torch.ones(1000))
distributed.shutdown()
names = set()
for task in os.listdir("/proc/self/task"):
    try:
        names.add(open(f"/proc/self/task/{task}/comm").read().strip())
    except OSError:
        pass
print("gloo threads after shutdown:", sorted(n for n in names if "gloo" in n))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PyDLL(None).usleep is libc's")
def test_shutdown_frees_the_process_group_so_no_gloo_thread_outlives_python(tmp_path):
    """``distributed.shutdown`` frees the process group (the trainer's DDP wrapper lets go of it, and
    ``torch.distributed.nn`` captured no group): gloo's worker threads are joined while Python is alive.

    A gloo worker often drops the last reference to a collective's tensors after Python's call returned
    (the tensor's Python object is then freed on that thread, under the GIL). A worker that does so while
    the interpreter finalizes is ended by CPython inside a C++ destructor: the process aborts with
    "terminate called without an active exception" (the rare abort of two-process training). Here the
    late worker is made certain (rank 0 does not wait for a collective that rank 1 joins 0.5 s later, and
    an exit handler keeps the GIL meanwhile): with the group alive at exit, rank 0 aborts every time.
    """
    script = tmp_path / "leave.py"
    script.write_text(_SHUTDOWN_SCRIPT)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and "terminate called" not in err, f"rank {rank}: {p.returncode}\n{out}{err}"
        assert "gloo threads after shutdown: []" in out, f"rank {rank}: {out}{err}"
