"""The training command end to end on a tiny dataset file: logs, checkpoints, resume, YAML."""

import csv

import numpy as np
import pytest
import torch

from cfgrl_ros.checkpoint import load_checkpoint
from training.train import TrainConfig, TrainError, main, parse_config, step_seed, train


def write_tiny_dataset(path, episodes=4, length=12, size=16, seed=0):
    rng = np.random.default_rng(seed)
    rows = episodes * length
    terminals = np.zeros(rows, bool)
    terminals[length - 1::length] = True
    arrays = dict(
        observations=rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8),
        actions=rng.uniform(-1, 1, (rows, 2)).astype(np.float32),
        terminals=terminals,
        qpos=rng.normal(size=(rows, 3)).astype(np.float32),
        qvel=rng.normal(size=(rows, 3)).astype(np.float32),
        oracle_reps=rng.normal(size=(rows, 2)).astype(np.float32),
    )
    np.savez_compressed(path, **arrays)
    np.savez_compressed(str(path).replace(".npz", "-val.npz"), **arrays)
    return path


def tiny_config(tmp_path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    dataset = write_tiny_dataset(tmp_path / "tiny-v0.npz")
    values = dict(dataset=str(dataset), out=str(tmp_path / "run"), steps=6, batch_size=8, log_every=2,
                  val_every=3, val_batches=2, save_every=3, seed=7)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("goal_mode", ["oracle", "image"])
def test_train_writes_checkpoint_and_logs(tmp_path, goal_mode):
    config = tiny_config(tmp_path, goal_mode=goal_mode)
    checkpoint_path = train(config)
    checkpoint = load_checkpoint(checkpoint_path)
    assert checkpoint.step == 6 and checkpoint.config.goal_mode == goal_mode
    assert checkpoint.config.image_size == 16 and checkpoint.config.action_dim == 2
    assert len(checkpoint.metadata["dataset_fingerprint"]) > 10
    assert any(k.endswith("exp_avg") for k in checkpoint.train_state)
    with open(tmp_path / "run" / "metrics.csv") as f:
        names = {row["name"] for row in csv.DictReader(f)}
    assert {"train/loss", "train/steps_per_s", "val/loss"} <= names
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    saved = tmp_path / "run" / "train_config.yaml"  # says what ran (bf16 is CUDA-only), and is a --config again
    assert saved.read_text().startswith("# ran on cpu x 1 process(es), in fp32\n")
    assert parse_config(["--config", str(saved)]) == config


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_cuda_training_in_either_precision(tmp_path, precision):
    checkpoint = load_checkpoint(train(tiny_config(tmp_path, device="cuda", precision=precision)))
    assert checkpoint.step == 6
    assert all(torch.isfinite(t).all() for t in checkpoint.policy.state_dict().values() if t.is_floating_point())
    assert checkpoint.metadata["train_config"].count(f'"precision": "{precision}"') == 1


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight = train(tiny_config(tmp_path / "a"))
    train(tiny_config(tmp_path / "b", steps=3))
    resumed = train(tiny_config(tmp_path / "b", steps=6, resume=True))
    a, b = load_checkpoint(straight).policy.state_dict(), load_checkpoint(resumed).policy.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_resume_refuses_another_runs_checkpoint(tmp_path, capsys):
    train(tiny_config(tmp_path, steps=3))
    with pytest.raises(TrainError, match=r"seed 7 != 8; lr 0.0003 != 0.001"):
        train(tiny_config(tmp_path, steps=6, resume=True, seed=8, lr=1e-3))
    other_data = tiny_config(tmp_path / "other", steps=6, resume=True, out=str(tmp_path / "run"))
    write_tiny_dataset(other_data.dataset, seed=1)  # same shapes, other rows
    with pytest.raises(SystemExit, match="cfgrl-train: error: cannot resume .*dataset fingerprint"):
        main(["--dataset", other_data.dataset, "--out", other_data.out, "--steps", "6", "--batch-size", "8",
              "--seed", "7", "--resume"])
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").step == 3  # untouched
    # The policy's own settings are named field by field, and the way out is one that works.
    with pytest.raises(TrainError, match=r"goal_encoder 'shared' != 'separate'\); resume with the saved ones, or "
                                         r"start a new run in another --out"):
        train(tiny_config(tmp_path, steps=6, resume=True, goal_encoder="separate"))


def test_resume_says_when_there_is_nothing_to_train(tmp_path, capsys):
    path = train(tiny_config(tmp_path, steps=3))
    saved = path.read_bytes()
    with pytest.raises(TrainError, match="it is at step 3 already; pass a larger --steps"):
        train(tiny_config(tmp_path, steps=2, resume=True))
    capsys.readouterr()
    assert train(tiny_config(tmp_path, steps=3, resume=True)) == path
    assert "is at step 3 = --steps already: nothing to train" in capsys.readouterr().err
    assert path.read_bytes() == saved


def test_an_existing_run_is_never_overwritten_and_resume_trims_its_logs(tmp_path):
    train(tiny_config(tmp_path, steps=3))
    with pytest.raises(TrainError, match="checkpoint.safetensors exists: pass --resume"):
        train(tiny_config(tmp_path, steps=6))
    with pytest.raises(TrainError, match="precision 'bf16' != 'fp32'"):
        train(tiny_config(tmp_path, steps=6, resume=True, precision="fp32"))
    metrics = tmp_path / "run" / "metrics.csv"
    with open(metrics, "a") as file:  # what a run killed after its step-3 checkpoint had logged
        file.write("4,train/loss,9.99,0\n")
    train(tiny_config(tmp_path, steps=6, resume=True))
    with open(metrics) as file:
        rows = [(int(row["step"]), row["name"]) for row in csv.DictReader(file)]
    assert len(rows) == len(set(rows)) and max(step for step, _ in rows) == 6  # no row twice
    assert ("9.99" not in metrics.read_text()) and (4, "train/loss") in rows


def test_diverged_weights_never_replace_the_last_checkpoint(tmp_path, monkeypatch):
    train(tiny_config(tmp_path, steps=3))
    good = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    real_step = torch.optim.Adam.step

    def diverging_step(self, *args, **kwargs):  # the weights blow up, the loss of that step was finite
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", diverging_step)
    with pytest.raises(FloatingPointError, match="NaN or inf by step 6; the last good checkpoint is kept"):
        train(tiny_config(tmp_path, steps=8, resume=True, log_every=100))  # saves at 6, logs only at 8
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == good


def test_a_bare_cuda_device_means_this_processs_gpu():
    from training.train import resolve_device

    assert resolve_device("cuda", 3) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", 3) == torch.device("cuda", 1)
    assert resolve_device("cpu", 3) == torch.device("cpu")


def test_the_null_goal_starts_at_the_reference_scale():
    from cfgrl_ros.policy import CFGRLPolicy, PolicyConfig

    torch.manual_seed(0)
    image = CFGRLPolicy(PolicyConfig(action_dim=2, goal_mode="image", image_size=16)).null_goal
    assert image.numel() == 512 and abs(image.std().item() - 512 ** -0.5) < 0.01  # flax nn.Embed: 1/sqrt(dim)


def test_bad_settings_are_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "train.yaml").write_text("lr: 3e-4\nsteps: 12\n")  # YAML reads 3e-4 as text: taken as a number
    config = parse_config(["--config", str(tmp_path / "train.yaml"), "--dataset", "x.npz"])
    assert config.lr == 3e-4 and config.steps == 12
    for flags, reason in ((["--steps", "0"], "steps must be >= 1, got 0"),
                          (["--lr", "nan"], "lr must be finite and > 0"),
                          (["--save-every", "0", "--p-aug", "2"], "p_aug must be within \\[0, 1\\], got 2.0; save_every"),
                          (["--device", "tpu"], "device 'tpu' is not a torch device"),
                          (["--config", str(tmp_path / "missing.yaml")], "cannot read --config")):
        with pytest.raises(SystemExit, match=f"cfgrl-train: error: .*{reason}"):
            parse_config(["--dataset", "x.npz", *flags])
    (tmp_path / "bad.yaml").write_text("steps: 2.5\n")
    with pytest.raises(SystemExit, match="steps must be an integer, got float 2.5"):
        parse_config(["--config", str(tmp_path / "bad.yaml"), "--dataset", "x.npz"])
    (tmp_path / "bad.yaml").write_text("goal_mode: goals\nprecision: fp16\n")  # YAML skips argparse's choices
    with pytest.raises(SystemExit, match="goal_mode must be oracle or image.*precision must be bf16 or fp32"):
        parse_config(["--config", str(tmp_path / "bad.yaml"), "--dataset", "x.npz"])
    for flags in (["--goal-mode", "goals"], ["--precision", "fp16"]):  # the flags list their choices
        with pytest.raises(SystemExit) as exit_info:
            parse_config(["--dataset", "x.npz", *flags])
        assert exit_info.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_ranks_never_share_a_random_stream():
    streams = {step_seed(7, step, rank) + k for step in range(50) for rank in range(8) for k in range(3)}
    assert len(streams) == 50 * 8 * 3
    assert step_seed(7, 5, 0) == (7 * 1_000_003 + 5 * 7_919) % 2**63  # one process: the seeds of before


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    one = load_checkpoint(train(tiny_config(tmp_path / "a"))).policy.null_goal
    two = load_checkpoint(train(tiny_config(tmp_path / "b"))).policy.null_goal
    other = load_checkpoint(train(tiny_config(tmp_path / "c", seed=8))).policy.null_goal
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    assert not torch.equal(one, other)


def test_yaml_config_with_flag_override(tmp_path):
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("dataset: data/x.npz\nsteps: 123\nbatch_size: 64\ngoal_mode: image\n")
    config = parse_config(["--config", str(yaml_file), "--steps", "50", "--compile"])
    assert (config.dataset, config.steps, config.batch_size, config.goal_mode, config.compile) == \
        ("data/x.npz", 50, 64, "image", True)
    yaml_file.write_text("dataset: x.npz\nstep: 3\n")
    with pytest.raises(SystemExit, match="unknown training options"):
        parse_config(["--config", str(yaml_file)])
    with pytest.raises(SystemExit, match="--dataset is required"):
        parse_config([])


def test_torchrun_data_parallel_on_cpu(tmp_path):
    """The same script under torchrun: 2 processes, gloo over loopback, DistributedDataParallel."""
    import os
    import subprocess
    import sys

    config = tiny_config(tmp_path, steps=4, save_every=4, val_every=4)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "training.train", "--dataset", config.dataset, "--out", config.out, "--steps", "4",
               "--batch-size", "8", "--log-every", "2", "--val-every", "4", "--save-every", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=os.getcwd())
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert checkpoint.step == 4
    single = load_checkpoint(train(tiny_config(tmp_path / "single", steps=4, save_every=4, val_every=4)))
    # Two ranks draw different batches of 4 each, so the weights differ from a one-process run.
    assert not torch.equal(checkpoint.policy.null_goal, single.policy.null_goal)
