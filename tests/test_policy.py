"""The policy, the guided sampler and checkpoints, on CPU."""

import numpy as np
import json

import pytest
import torch
import torch.nn.functional as F

from cfgrl_ros.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cfgrl_ros.engines import example_inputs
from cfgrl_ros.policy import CFGRLPolicy, ImpalaSmallEncoder, PolicyConfig, SameMaxPool
from cfgrl_ros.sampler import GuidedSampler

ORACLE = PolicyConfig(action_dim=5, goal_mode="oracle", goal_dim=3)
IMAGE = PolicyConfig(action_dim=5, goal_mode="image")


def make_policy(config: PolicyConfig = ORACLE, seed: int = 0) -> CFGRLPolicy:
    torch.manual_seed(seed)
    return CFGRLPolicy(config).eval()


def same_max_pool_reference(x: np.ndarray) -> np.ndarray:
    """JAX "SAME" 3x3/2 max-pool by hand, from lax.padtype_to_pads' rule: pad_low = total // 2."""
    n, c, h, w = x.shape
    out_h, out_w = -(-h // 2), -(-w // 2)
    low_h = max((out_h - 1) * 2 + 3 - h, 0) // 2
    low_w = max((out_w - 1) * 2 + 3 - w, 0) // 2
    out = np.empty((n, c, out_h, out_w), x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            rows = slice(max(2 * i - low_h, 0), min(2 * i - low_h + 3, h))
            cols = slice(max(2 * j - low_w, 0), min(2 * j - low_w + 3, w))
            out[:, :, i, j] = x[:, :, rows, cols].max(axis=(2, 3))
    return out


@pytest.mark.parametrize("size", [64, 7, 8])
def test_same_max_pool_matches_jax_semantics(size):
    x = torch.randn(2, 4, size, size)
    expected = same_max_pool_reference(x.numpy())
    got = SameMaxPool()(x).numpy()
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    if size % 2 == 0:  # even sizes: PyTorch's symmetric padding=1 would pool different windows
        assert not torch.equal(F.max_pool2d(x, 3, 2, padding=1), torch.from_numpy(got))


def test_encoder_shapes_and_parameter_count():
    encoder = ImpalaSmallEncoder()
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    features = encoder(images)
    assert features.shape == (3, 512)
    assert sum(p.numel() for p in encoder.parameters()) == 1_105_056  # the notes' ~1.1 M
    stage_shapes = []
    x = images.permute(0, 3, 1, 2).float() / 255
    for module in encoder.stages:
        x = module(x)
        stage_shapes.append(tuple(x.shape[1:]))
    assert stage_shapes[1] == (16, 32, 32) and stage_shapes[4] == (32, 16, 16) and stage_shapes[7] == (32, 8, 8)


def test_encoder_scales_pixels_to_unit_range():
    encoder = ImpalaSmallEncoder()
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    x = images.permute(0, 3, 1, 2).float() / 255
    expected = F.gelu(encoder.project(F.relu(encoder.stages(x)).flatten(1)), approximate="tanh")
    torch.testing.assert_close(encoder(images), expected)


def test_whole_policy_size_and_initialisation():
    policy = make_policy()
    assert sum(p.numel() for p in policy.parameters()) == 2_162_856  # the notes' ~2.16 M
    for name, parameter in policy.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(parameter) == 0, name
    first = torch.cat([policy.velocity.condition_in.weight, policy.velocity.action_in.weight], dim=1)
    bound = (6 / sum(first.shape)) ** 0.5
    assert first.abs().max() <= bound and first.abs().max() > 0.9 * bound


def test_velocity_mlp_uses_raw_scalar_time_and_tanh_gelu():
    policy = make_policy()
    mlp = policy.velocity
    condition = torch.randn(4, 512)
    x, t = torch.randn(4, 5), torch.rand(4, 1)
    h = F.gelu(condition + torch.cat([x, t], 1) @ mlp.action_in.weight.T, approximate="tanh")
    for layer in mlp.layers[:-1]:
        h = F.gelu(layer(h), approximate="tanh")
    torch.testing.assert_close(mlp(condition, x, t), mlp.layers[-1](h))


@pytest.mark.parametrize("config", [ORACLE, IMAGE], ids=["oracle", "image"])
def test_guidance_weight_selects_branch(config):
    """w=1 is the conditional velocity, w=0 the unconditional one (one Euler step, no clipping)."""
    policy = make_policy(config)
    sampler = GuidedSampler(policy)
    obs, goals, _, noise = example_inputs(config, batch_size=3)
    noise = noise * 0.1
    with torch.no_grad():
        obs_repr = policy.encode_observation(obs)
        t = torch.zeros(3, 1)
        v_goal = policy.velocity(policy.velocity.condition(obs_repr, policy.encode_goal(goals)), noise, t)
        v_null = policy.velocity(policy.velocity.condition(obs_repr, policy.null_goals(3)), noise, t)
        condition = sampler.encode(obs, goals)
        one, zero = torch.tensor(1.0), torch.tensor(0.0)
        step = lambda w: sampler.euler_step(condition, noise, zero, one, torch.full((3,), w))
        torch.testing.assert_close(step(1.0), noise + v_goal)
        torch.testing.assert_close(step(0.0), noise + v_null)
        torch.testing.assert_close(step(3.0), noise + v_null + 3 * (v_goal - v_null))
        # The full sampler with one step is the same, clipped at the end only.
        torch.testing.assert_close(sampler(obs, goals, torch.ones(3), noise, flow_steps=1), (noise + v_goal).clamp(-1, 1))
    assert not torch.allclose(v_goal, v_null)


def test_per_sample_w_and_fixed_noise_reproduce_actions():
    sampler = GuidedSampler(make_policy())
    obs, goals, _, noise = example_inputs(ORACLE, batch_size=4)
    w = torch.tensor([0.0, 1.0, 3.0, 3.0])
    with torch.no_grad():
        first = sampler(obs, goals, w, noise)
        again = sampler(obs, goals, w, noise.clone())
        single = torch.cat([sampler(obs[i:i + 1], goals[i:i + 1], w[i:i + 1], noise[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(first, single, rtol=1e-5, atol=1e-5)
    assert first.abs().max() <= 1.0
    assert not torch.allclose(first[1], first[2])  # different w, different action


def test_sampler_rejects_bad_shapes():
    sampler = GuidedSampler(make_policy())
    obs, goals, w, noise = example_inputs(ORACLE, batch_size=2)
    with pytest.raises(ValueError, match="w must have shape"):
        sampler(obs, goals, torch.ones(3), noise)
    with pytest.raises(ValueError, match=r"noise must be float \(2, 5\), got torch.float32 \(2, 4\)"):
        sampler(obs, goals, w, torch.zeros(2, 4))
    for bad_steps in (0, True, 2.0):  # True is an int to Python, not a step count
        with pytest.raises(ValueError, match="flow_steps"):
            sampler(obs, goals, w, noise, flow_steps=bad_steps)
    # What would run but give other actions, or fail deep inside the model: named up front.
    with pytest.raises(ValueError, match=r"observations must be \(B, 64, 64, 3\) uint8, got torch.float32"):
        sampler(obs.float() / 255, goals, w, noise)
    with pytest.raises(ValueError, match=r"observations must be \(B, 64, 64, 3\) uint8, got torch.uint8 \(2, 32, 32, 3\)"):
        sampler(obs[:, :32, :32], goals, w, noise)
    with pytest.raises(ValueError, match=r"oracle goals must be float \(2, 3\), got torch.float32 \(2, 4\)"):
        sampler(obs, torch.zeros(2, 4), w, noise)
    image_sampler = GuidedSampler(make_policy(IMAGE))
    obs, goal_images, w, noise = example_inputs(IMAGE, batch_size=2)
    with pytest.raises(ValueError, match=r"goal images must be \(2, 64, 64, 3\) uint8, got torch.float32"):
        image_sampler(obs, goal_images.float(), w, noise)
    assert image_sampler(obs, goal_images, w, noise).shape == (2, 5)


def test_condition_dropout_uses_the_null_embedding():
    """With dropout 1-eps every goal is replaced: the loss no longer depends on the goal."""
    config = PolicyConfig(action_dim=5, goal_dim=3, condition_dropout=0.999999)
    policy = make_policy(config)
    obs, goals, _, _ = example_inputs(config, batch_size=8)
    batch = {"observations": obs, "actions": torch.rand(8, 5) * 2 - 1, "goals": goals}
    loss_a = policy.flow_matching_loss(batch, torch.Generator().manual_seed(1))
    loss_b = policy.flow_matching_loss({**batch, "goals": goals + 5}, torch.Generator().manual_seed(1))
    assert loss_a.item() == loss_b.item()
    loss_c = make_policy().flow_matching_loss({**batch, "goals": goals + 5}, torch.Generator().manual_seed(1))
    assert loss_c.item() != loss_a.item()


def test_loss_falls_on_a_tiny_dataset():
    """Actions are a function of the goal: the flow loss must fall well below its starting value."""
    torch.manual_seed(0)
    policy = CFGRLPolicy(PolicyConfig(action_dim=2, goal_dim=2))
    goals = torch.rand(32, 2) * 2 - 1
    batch = {"observations": torch.randint(0, 256, (32, 64, 64, 3), dtype=torch.uint8),
             "actions": goals.clone() * 0.8, "goals": goals}
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = policy.flow_matching_loss(batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20]), (losses[:3], losses[-3:])


@pytest.mark.parametrize("config", [ORACLE, IMAGE], ids=["oracle", "image"])
def test_checkpoint_round_trip(tmp_path, config):
    policy = make_policy(config, seed=3)
    path = save_checkpoint(tmp_path / "policy.safetensors", policy, dataset_fingerprint="fp123", step=42,
                           train_state={"optim.0.exp_avg": torch.ones(3)})
    loaded = load_checkpoint(path)
    assert loaded.config == config and loaded.step == 42
    assert loaded.metadata["dataset_fingerprint"] == "fp123" and loaded.metadata["goal_mode"] == config.goal_mode
    assert loaded.metadata["code_version"].startswith("0.")
    torch.testing.assert_close(loaded.train_state["optim.0.exp_avg"], torch.ones(3))
    for name, value in policy.state_dict().items():
        torch.testing.assert_close(loaded.policy.state_dict()[name], value, rtol=0, atol=0)
    inputs = example_inputs(config, batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(GuidedSampler(loaded.policy)(*inputs), GuidedSampler(policy)(*inputs))


def test_fp16_checkpoint_loads_as_fp32(tmp_path):
    policy = make_policy()
    path = save_checkpoint(tmp_path / "half.safetensors", policy, dtype=torch.float16)
    loaded = load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in loaded.policy.parameters())
    assert path.stat().st_size < 5_000_000
    torch.testing.assert_close(loaded.policy.null_goal, policy.null_goal, atol=1e-3, rtol=1e-3)


def test_corrupt_checkpoints_give_clear_errors(tmp_path):
    path = save_checkpoint(tmp_path / "good.safetensors", make_policy())
    data = path.read_bytes()

    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(flipped)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a cfgrl_ros checkpoint"):
        load_checkpoint(foreign)

    diverged = make_policy()  # intact file, valid digest, unusable weights
    with torch.no_grad():
        diverged.null_goal.fill_(float("nan"))
    with pytest.raises(CheckpointError, match="NaN or inf weights \\(null_goal\\).*diverge"):
        load_checkpoint(save_checkpoint(tmp_path / "diverged.safetensors", diverged))


@pytest.mark.parametrize("change, reason", [
    ({"hidden_dims": []}, "hidden_dims must be a non-empty tuple of integers >= 1, got \\(\\)"),
    ({"encoder_dim": -1}, "encoder_dim must be an integer >= 1, got -1"),
    ({"action_dim": "5"}, "action_dim must be an integer >= 1, got '5'"),
    ({"encoder_channels": [16, 0]}, "encoder_channels must be a non-empty tuple"),
    (None, "a PolicyConfig is a mapping of its fields, got list"),
    ({"step": "12k"}, "invalid training step '12k'"),
])
def test_checkpoint_metadata_that_builds_no_model_is_a_checkpoint_error(tmp_path, change, reason):
    """The digest covers the tensors, not the metadata: a hand-edited config must still fail by name."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = save_checkpoint(tmp_path / "good.safetensors", make_policy(), step=3)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    if change is None:
        metadata["config"] = json.dumps(list(config.values()))
    elif "step" in change:
        metadata["step"] = change["step"]
    else:
        metadata["config"] = json.dumps({**config, **change})
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(path)


def test_core_imports_without_ros():
    """The ROS-free core must import where rclpy and the ROS messages cannot (blocked here)."""
    import subprocess
    import sys

    modules = ["cfgrl_ros.policy", "cfgrl_ros.sampler", "cfgrl_ros.checkpoint", "cfgrl_ros.engines",
               "cfgrl_ros.image", "cfgrl_ros.control", "cfgrl_ros.sim", "training.data", "training.train",
               "training.evaluate", "training.export", "training.generate_dataset", "training.reproduce",
               "training.bags_to_dataset"]
    code = ("import sys\n"
            "for name in ('rclpy', 'sensor_msgs', 'std_msgs', 'builtin_interfaces', 'cfgrl_ros.msg'):\n"
            "    sys.modules[name] = None  # any import of them now raises ImportError\n"
            f"for module in {modules!r}:\n"
            "    __import__(module)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
