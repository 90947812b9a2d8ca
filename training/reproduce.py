"""One command for the paper's headline: generate -> train -> evaluate -> report, resumable.

    python -m training.reproduce --task visual-cube-single --goal-mode oracle --scale smoke --out runs/repro-smoke
    python -m training.reproduce --task visual-cube-single --goal-mode oracle --scale paper \\
        --out runs/repro-cube --workers 16 --device cuda
    python -m training.reproduce --task visual-cube-single --goal-mode image --scale paper \\
        --out runs/repro-cube-image --data-dir runs/repro-cube/data --device cuda   # same dataset, goal images

A scale is a YAML file in config/reproduce/ (or a path to one): dataset, training and evaluation
settings. Each stage keeps a record, `stage.json`, beside its outputs: the hash of its inputs (its
settings and the fingerprints of what the stage before it made), its status, wall time, machine and
command. A stage recorded as done with the same hash, whose outputs are all present, is skipped; an
interrupted one resumes (generation from its finished shards, training from its last checkpoint;
evaluation starts over). Once a stage has run, every stage after it runs again. Work made from
other inputs is never replaced silently: the command stops and names the inputs that differ, and
`--redo STAGE` discards that stage's work.

The report (report/report.md) states the command, the machines, each stage's wall time, the dataset
size, training steps and episodes, the success table and plot, and computes whether CFGRL at w=3
reaches the issue's target against flow GCBC at w=1: at least twice the success rate, with
non-overlapping 95% confidence intervals.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco (generation and evaluation render)

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors import safe_open  # noqa: E402

from cfgrl_ros.checkpoint import CheckpointError, code_version  # noqa: E402
from cfgrl_ros.engines import load_engine  # noqa: E402
from training.data import DatasetError, dataset_fingerprint  # noqa: E402
from training.dataset_files import read_npz_header  # noqa: E402
from training.evaluate import EvaluationError, evaluate, markdown_table, write_report  # noqa: E402
from training.generate_dataset import ENVS, GENERATION_ERRORS, GenerationConfig, GenerationError, generate  # noqa: E402
from training.machine import cpu_model  # noqa: E402
from training.train import TrainConfig, TrainError, train  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SCALES_DIR = REPO_ROOT / "config" / "reproduce"
STAGES = ("generate", "train", "evaluate", "report")
TASKS = {f"visual-{env}": env for env in ENVS}  # visual-cube-single -> cfgrl-generate's cube-single
GOAL_MODES = ("oracle", "image")
BASELINE_W, GUIDED_W, TARGET_FACTOR = 1.0, 3.0, 2.0  # the issue: CFGRL w=3 >= 2x flow GCBC w=1
# Table 3 of the paper (w=3, oracle goals), success %: (flow GCBC, CFGRL).
PUBLISHED = {("visual-cube-single", "oracle"): (13, 37), ("visual-scene", "oracle"): (25, 40)}

DATASET_KEYS = {f.name for f in dataclasses.fields(GenerationConfig)} - {"env", "variant"} | {"workers"}
TRAINING_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"dataset", "env_name", "out", "goal_mode",
                                                                      "device", "resume"}
EVALUATION_KEYS = {"ws", "tasks", "episodes_per_task", "max_steps", "flow_steps", "seed", "workers", "envs_per_worker"}
# Settings that change what a stage computes; the rest (logging, process counts, devices) do not.
TRAINING_RESULT_KEYS = ("goal_mode", "goal_encoder", "steps", "batch_size", "lr", "p_aug", "condition_dropout", "seed",
                        "precision")
EVALUATION_RESULT_KEYS = ("ws", "tasks", "episodes_per_task", "max_steps", "flow_steps", "seed")


class ReproduceError(RuntimeError):
    """The run cannot go on: a bad scale or option, or a stage that did not produce what it should."""


class StaleStageError(ReproduceError):
    """A stage directory holds work made from other inputs than this run's."""


# ---------------------------------------------------------------------------------------------
# Scales and the run plan.


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    description: str
    dataset: dict
    training: dict
    evaluation: dict


def available_scales() -> list[str]:
    return sorted(path.stem for path in SCALES_DIR.glob("*.yaml"))


def load_scale(name: str) -> Scale:
    """A scale by name (config/reproduce/<name>.yaml) or by path to a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SCALES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ReproduceError(f"unknown scale {name!r}: choose from {available_scales()} or give a YAML file's path")
    raw = yaml.safe_load(path.read_text()) or {}
    sections = {"dataset": DATASET_KEYS, "training": TRAINING_KEYS, "evaluation": EVALUATION_KEYS}
    unknown = set(raw) - {*sections, "description"}
    if unknown:
        raise ReproduceError(f"{path}: unknown sections {sorted(unknown)}; expected {sorted(sections)} and description")
    for section, allowed in sections.items():
        if not isinstance(raw.get(section), dict):
            raise ReproduceError(f"{path}: section {section!r} is missing or not a mapping")
        unknown = set(raw[section]) - allowed
        if unknown:
            raise ReproduceError(f"{path}: unknown {section} settings {sorted(unknown)}; allowed: {sorted(allowed)}")
    ws = [float(w) for w in raw["evaluation"].get("ws", [])]
    if BASELINE_W not in ws or GUIDED_W not in ws:
        raise ReproduceError(f"{path}: evaluation.ws {ws} must include w={BASELINE_W:g} and w={GUIDED_W:g}, "
                             "which the report compares")
    return Scale(path.stem, str(raw.get("description", "")), raw["dataset"], raw["training"], raw["evaluation"])


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReproduceError(f"--device {device}: CUDA is not available on this machine")
    return device


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything one invocation needs: the task, the scale, where things go, and how to run them."""

    task: str
    goal_mode: str
    scale: Scale
    out: Path
    data_dir: Path
    device: str
    backend: str = "torch"
    workers: int | None = None  # overrides both the dataset and the evaluation workers of the scale
    command: str = ""

    @property
    def env_id(self) -> str:
        return f"{self.task}-v0"

    def generation_config(self) -> GenerationConfig:
        settings = {k: v for k, v in self.scale.dataset.items() if k != "workers"}
        try:
            return GenerationConfig(env=TASKS[self.task], variant="play", **settings)
        except GenerationError as error:
            raise ReproduceError(f"scale {self.scale.name}: {error}") from error

    def dataset_path(self) -> Path:
        return self.data_dir / f"{self.generation_config().dataset_name}.npz"

    def train_config(self) -> TrainConfig:
        return TrainConfig(dataset=str(self.dataset_path()), env_name=self.env_id, out=str(self.stage_dir("train")),
                           goal_mode=self.goal_mode, device=self.device, resume=True, **self.scale.training)

    def evaluation_settings(self) -> dict:
        settings = dict(self.scale.evaluation)
        if self.workers is not None:
            settings["workers"] = self.workers
        return settings

    def generation_workers(self) -> int:
        return self.workers if self.workers is not None else int(self.scale.dataset.get("workers", 1))

    def stage_dir(self, stage: str) -> Path:
        return {"generate": self.data_dir, "train": self.out / "train", "evaluate": self.out / "eval",
                "report": self.out / "report"}[stage]

    def record_path(self, stage: str) -> Path:
        if stage == "generate":  # the data directory may be shared by runs (and hold other datasets)
            return self.data_dir / f"{self.generation_config().dataset_name}.stage.json"
        return self.stage_dir(stage) / "stage.json"


# ---------------------------------------------------------------------------------------------
# Stage records and the stage runner.


@dataclasses.dataclass
class StageRecord:
    stage: str
    inputs_hash: str
    inputs: dict
    command: str
    machine: dict
    status: str = "running"  # "running" until the stage finishes, then "done"
    attempts: int = 0
    wall_s: float = 0.0  # summed over attempts (a killed process loses its last attempt's time)
    started: str = ""
    finished: str = ""
    outputs: dict = dataclasses.field(default_factory=dict)  # file (relative to the record) -> size in bytes
    summary: dict = dataclasses.field(default_factory=dict)  # stage facts for the report and later stages


def read_record(path: Path) -> StageRecord | None:
    if not path.is_file():
        return None
    try:
        return StageRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise ReproduceError(f"{path} is not a readable stage record ({error}); delete it to rerun the stage") \
            from error


def write_record(path: Path, record: StageRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(dataclasses.asdict(record), indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a record is always whole


def hash_inputs(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def outputs_present(path: Path, record: StageRecord) -> bool:
    files = {path.parent / name: size for name, size in record.outputs.items()}
    return all(file.is_file() and file.stat().st_size == size for file, size in files.items())


def input_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += input_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def machine_info() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "code": tree_version()}


def tree_version() -> str:
    """code_version() plus '-dirty' when tracked files differ from the commit."""
    try:
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return code_version()
    return code_version() + ("-dirty" if changes else "")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


StageBody = Callable[[bool], tuple[dict, dict]]  # resuming -> (outputs, summary)


def run_stage(plan: Plan, stage: str, inputs: dict, body: StageBody, discard: Callable[[], None],
              fresh: bool) -> tuple[StageRecord, bool]:
    """Skip, resume or run one stage; returns its record and whether it ran.

    fresh: the stage must start over (--redo, or a stage before it ran in this invocation).
    """
    path, digest = plan.record_path(stage), hash_inputs(inputs)
    record = read_record(path)
    if record is not None and not fresh and record.inputs_hash != digest:
        differences = "\n  ".join(input_differences(record.inputs, inputs)) or "(hash only)"
        elsewhere = "--data-dir" if stage == "generate" else "--out"
        raise StaleStageError(
            f"{stage}: {path.parent} holds work made from other inputs (recorded -> now):\n  {differences}\n"
            f"Rerun with the recorded settings to keep it, pass --redo {stage} to discard it, "
            f"or choose another {elsewhere}.")
    if record is not None and not fresh and record.status == "done" and outputs_present(path, record):
        print(f"[{stage}] done earlier ({format_seconds(record.wall_s)}, {record.finished}): skipped", flush=True)
        return record, False
    if fresh or (record is not None and record.status == "done"):  # invalidated, or its outputs went missing
        discard()
        record = None
    resuming = record is not None
    record = record or StageRecord(stage, digest, inputs, plan.command, {}, started=now())
    record.attempts += 1
    record.command, record.machine = plan.command, machine_info()  # of the latest attempt
    write_record(path, record)
    print(f"[{stage}] {'resuming' if resuming else 'running'} (attempt {record.attempts})", flush=True)
    start = time.perf_counter()
    try:
        record.outputs, record.summary = body(resuming)
        record.status, record.finished = "done", now()
    finally:  # an interrupted attempt still counts its time
        record.wall_s = round(record.wall_s + time.perf_counter() - start, 2)
        write_record(path, record)
    print(f"[{stage}] done in {format_seconds(time.perf_counter() - start)}", flush=True)
    return record, True


def sizes(directory: Path, paths: list[Path]) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in paths}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The four stages.


def generation_stage(plan: Plan) -> tuple[dict, StageBody, Callable[[], None]]:
    cfg = plan.generation_config()
    name = cfg.dataset_name

    def body(resuming: bool) -> tuple[dict, dict]:
        preview = plan.data_dir / f"{name}.preview.png"
        train_path, val_path = generate(cfg, plan.data_dir, workers=plan.generation_workers(), preview=preview)
        record_path = plan.data_dir / f"{name}.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        summary = {
            "dataset": train_path.name, "fingerprint": dataset_fingerprint(train_path),
            "train_rows": npz_rows(train_path), "val_rows": npz_rows(val_path),
            "bytes": train_path.stat().st_size + val_path.stat().st_size,
            "transitions_per_second": record.get("transitions_per_second"), "workers": record.get("workers"),
        }
        return sizes(plan.data_dir, [train_path, val_path, preview]), summary

    def discard() -> None:  # only this dataset's files: the directory may hold others
        for path in plan.data_dir.glob(f"{name}*"):
            if path.suffix != ".json" or path.name == f"{name}.json":  # keep the stage record until rewritten
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    return {"generation": dataclasses.asdict(cfg)}, body, discard


def npz_rows(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        (rows, *_), _ = read_npz_header(archive, "actions")
    return int(rows)


def training_stage(plan: Plan, generated: StageRecord) -> tuple[dict, StageBody, Callable[[], None]]:
    config = plan.train_config()
    directory = plan.stage_dir("train")
    checkpoint_path = directory / "checkpoint.safetensors"
    inputs = {"dataset": generated.summary["fingerprint"],
              "training": {key: getattr(config, key) for key in TRAINING_RESULT_KEYS}}

    def body(resuming: bool) -> tuple[dict, dict]:
        if not resuming and checkpoint_path.exists():
            raise StaleStageError(f"train: {checkpoint_path} exists but no stage record says what made it; "
                                  "pass --redo train to discard it, or choose another --out")
        checkpoint = train(config)
        metadata = checkpoint_metadata(checkpoint)
        if int(metadata.get("step", -1)) != config.steps:
            raise ReproduceError(f"train: {checkpoint} is at step {metadata.get('step')}, expected {config.steps}")
        summary = {"steps": config.steps, "batch_size": config.batch_size, "digest": metadata["sha256"],
                   "settings": dataclasses.asdict(config), **metrics_summary(directory / "metrics.csv")}
        return sizes(directory, [checkpoint]), summary

    return inputs, body, lambda: shutil.rmtree(directory, ignore_errors=True)


def checkpoint_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def metrics_summary(path: Path) -> dict:
    """Last train and validation loss and mean steps/s from train.py's metrics.csv."""
    last: dict[str, float] = {}
    rates = []
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            last[row["name"]] = float(row["value"])
            if row["name"] == "train/steps_per_s":
                rates.append(float(row["value"]))
    return {"final_train_loss": last.get("train/loss"), "final_val_loss": last.get("val/loss"),
            "mean_steps_per_s": round(sum(rates) / len(rates), 3) if rates else None}


def evaluation_stage(plan: Plan, trained: StageRecord) -> tuple[dict, StageBody, Callable[[], None]]:
    settings = plan.evaluation_settings()
    directory = plan.stage_dir("evaluate")
    checkpoint = plan.stage_dir("train") / "checkpoint.safetensors"
    inputs = {"checkpoint": trained.summary["digest"], "env": plan.env_id,
              "evaluation": {key: settings.get(key) for key in EVALUATION_RESULT_KEYS}}

    def body(resuming: bool) -> tuple[dict, dict]:
        (directory / "partial-results.json").unlink(missing_ok=True)  # from an earlier, interrupted attempt
        engine = load_engine(str(checkpoint), plan.backend, plan.device, flow_steps=settings.get("flow_steps", 16))
        results = evaluate(engine, plan.env_id, settings["ws"], checkpoint=str(checkpoint),
                           partial_path=directory / "partial-results.json",
                           **{k: v for k, v in settings.items() if k != "ws"})
        paths = write_report(results, directory)
        summary = {key: results[key] for key in ("wall_time_s", "env_steps", "env_steps_per_s", "max_steps",
                                                 "backend", "device", "workers", "env_slots")}
        summary["episodes"] = len(results["episodes"])
        summary["results_sha256"] = sha256_file(paths["json"])
        return sizes(directory, list(paths.values())), summary

    return inputs, body, lambda: shutil.rmtree(directory, ignore_errors=True)


def report_stage(plan: Plan, records: dict[str, StageRecord]) -> tuple[dict, StageBody, Callable[[], None]]:
    directory = plan.stage_dir("report")
    inputs = {"generate": records["generate"].summary["fingerprint"], "train": records["train"].summary["digest"],
              "evaluate": records["evaluate"].summary["results_sha256"]}

    def body(resuming: bool) -> tuple[dict, dict]:
        directory.mkdir(parents=True, exist_ok=True)
        eval_dir = plan.stage_dir("evaluate")
        results = json.loads((eval_dir / "results.json").read_text())
        comparison = compare(results)
        plot = directory / "success_vs_w.png"
        shutil.copyfile(eval_dir / "success_vs_w.png", plot)
        report = directory / "report.md"
        report.write_text(render_report(plan, records, results, comparison, markdown_table(results)))
        (directory / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n")
        return sizes(directory, [report, plot, directory / "comparison.json"]), {"target_met": comparison["target_met"]}

    return inputs, body, lambda: shutil.rmtree(directory, ignore_errors=True)


def reproduce(plan: Plan, redo: tuple[str, ...] = (), until: str = "report") -> dict[str, StageRecord]:
    """Run the stages up to `until`, skipping finished ones; returns the records of those run or skipped."""
    for stage in (*redo, until):
        if stage not in STAGES:
            raise ReproduceError(f"unknown stage {stage!r}; stages: {STAGES}")
    builders = {
        "generate": lambda records: generation_stage(plan),
        "train": lambda records: training_stage(plan, records["generate"]),
        "evaluate": lambda records: evaluation_stage(plan, records["train"]),
        "report": lambda records: report_stage(plan, records),
    }
    records: dict[str, StageRecord] = {}
    upstream_ran = False
    for stage in STAGES[: STAGES.index(until) + 1]:
        inputs, body, discard = builders[stage](records)
        records[stage], ran = run_stage(plan, stage, inputs, body, discard, fresh=upstream_ran or stage in redo)
        upstream_ran |= ran
    return records


# ---------------------------------------------------------------------------------------------
# The comparison and the report.


def overall_row(results: Mapping[str, Any], w: float) -> Mapping[str, Any]:
    for row in results["results"]:
        if float(row["w"]) == w:
            return row["overall"]
    raise ReproduceError(f"the evaluation has no w={w:g} (it has {results['ws']})")


def paired_outcomes(results: Mapping[str, Any], baseline_w: float, guided_w: float) -> dict[str, int]:
    """Episodes share start states and noise across w: count the pairs where exactly one succeeded."""
    outcome = {(float(e["w"]), e["task"], e["episode"]): bool(e["success"]) for e in results["episodes"]}
    pairs = [(outcome[(baseline_w, t, e)], outcome[(guided_w, t, e)])
             for (w, t, e) in outcome if w == baseline_w and (guided_w, t, e) in outcome]
    return {"pairs": len(pairs), "only_guided": sum(g and not b for b, g in pairs),
            "only_baseline": sum(b and not g for b, g in pairs)}


def compare(results: Mapping[str, Any], baseline_w: float = BASELINE_W, guided_w: float = GUIDED_W,
            factor: float = TARGET_FACTOR) -> dict:
    """The issue's target: success(w=3) >= 2 x success(w=1) and the two 95% intervals do not overlap."""
    baseline, guided = overall_row(results, baseline_w), overall_row(results, guided_w)
    ratio = guided["rate"] / baseline["rate"] if baseline["rate"] > 0 else None  # None: undefined (w=1 at 0%)
    ratio_met = guided["rate"] > 0 and guided["rate"] >= factor * baseline["rate"]
    separated = guided["ci95"][0] > baseline["ci95"][1]
    return {"baseline_w": baseline_w, "guided_w": guided_w, "factor": factor,
            "baseline": dict(baseline), "guided": dict(guided), "ratio": ratio,
            "ratio_met": bool(ratio_met), "cis_separated": bool(separated),
            "target_met": bool(ratio_met and separated), **paired_outcomes(results, baseline_w, guided_w)}


def percent(stats: Mapping[str, Any]) -> str:
    low, high = stats["ci95"]
    return f"{100 * stats['rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d} h" if hours else f"{minutes}:{secs:02d} min"


def describe_machine(machine: Mapping[str, Any]) -> str:
    return f"{machine['cpu']} ({machine['cores']} cores), GPU: {machine['gpu'] or 'none'}"


def comparison_lines(plan: Plan, c: Mapping[str, Any]) -> list[str]:
    b, g = c["baseline"], c["guided"]
    ratio = "undefined (w=1 scored 0%)" if c["ratio"] is None else f"{c['ratio']:.2f}x"
    verdict = "**met**" if c["target_met"] else "**not met**"
    lines = [
        f"Target (issue 7): CFGRL at w={c['guided_w']:g} at least {c['factor']:g}x flow GCBC at w={c['baseline_w']:g}, "
        f"with non-overlapping 95% confidence intervals: {verdict}.",
        "",
        "| policy | w | success, 95% Wilson CI | episodes |",
        "|---|---:|---:|---:|",
        f"| flow GCBC | {c['baseline_w']:g} | {percent(b)} | {b['episodes']} |",
        f"| CFGRL | {c['guided_w']:g} | {percent(g)} | {g['episodes']} |",
        "",
        f"- ratio: {ratio} (needs >= {c['factor']:g}x): {'yes' if c['ratio_met'] else 'no'}",
        f"- intervals: {'separate' if c['cis_separated'] else 'overlap'} "
        f"(CFGRL's lower bound {100 * g['ci95'][0]:.1f} vs GCBC's upper bound {100 * b['ci95'][1]:.1f})",
        f"- paired episodes (same start state and noise for both w): {c['only_guided']} of {c['pairs']} succeeded "
        f"only with w={c['guided_w']:g}, {c['only_baseline']} only with w={c['baseline_w']:g}",
    ]
    published = PUBLISHED.get((plan.task, plan.goal_mode))
    lines.append(f"- published (paper, Table 3, w=3): flow GCBC {published[0]}%, CFGRL {published[1]}%" if published
                 else "- published: none (the paper's visual experiments used oracle goals)")
    return lines


def run_lines(plan: Plan, records: Mapping[str, StageRecord], results: Mapping[str, Any]) -> list[str]:
    gen, tr, ev = (records[s] for s in ("generate", "train", "evaluate"))
    g = gen.inputs["generation"]
    t = tr.summary
    tasks, ws = results["tasks"], results["ws"]
    per_w = results["results"][0]["overall"]["episodes"]
    return [
        f"- dataset: `{gen.summary['dataset']}`, {g['num_episodes']} train + {g['num_val_episodes']} validation "
        f"episodes x {g['episode_length']} steps = {gen.summary['train_rows']:,} + {gen.summary['val_rows']:,} "
        f"transitions, {gen.summary['bytes'] / 1e6:,.1f} MB; OGBench play oracles, shadow map {g['shadow_size']}, "
        f"render mode {g['render_mode']}, seed {g['seed']}; generated at {gen.summary['transitions_per_second']} "
        f"transitions/s with {gen.summary['workers']} worker(s)",
        f"- training: {t['steps']:,} steps at batch {t['batch_size']}, goal mode {plan.goal_mode}, "
        f"lr {t['settings']['lr']:g}, p_aug {t['settings']['p_aug']:g}, goal dropout "
        f"{t['settings']['condition_dropout']:g}, device {t['settings']['device']}, precision "
        f"{t['settings'].get('precision', 'bf16')} (fp32 on a CPU); final train loss "
        f"{t['final_train_loss']:.4f}, validation loss {t['final_val_loss']:.4f}, mean {t['mean_steps_per_s']} steps/s",
        f"- evaluation: {len(ws)} values of w ({', '.join(f'{w:g}' for w in ws)}) x task(s) {tasks} x {results['episodes_per_task']} "
        f"episode(s) = {ev.summary['episodes']} episodes ({per_w} per w), at most {results['max_steps']} steps each, "
        f"{results['flow_steps']} flow steps, engine {results['backend']} on {results['device']}, "
        f"{ev.summary['env_steps']:,} env steps at {ev.summary['env_steps_per_s']}/s",
    ]


def stage_table(records: Mapping[str, StageRecord]) -> list[str]:
    lines = ["| stage | wall time | attempts | finished (UTC) | machine | code, torch |", "|---|---:|---:|---|---|---|"]
    for stage in STAGES[:-1]:
        r = records[stage]
        lines.append(f"| {stage} | {format_seconds(r.wall_s)} | {r.attempts} | {r.finished} | "
                     f"{describe_machine(r.machine)} | {r.machine['code']}, {r.machine['torch']} |")
    total = sum(records[s].wall_s for s in STAGES[:-1])
    lines.append(f"| total | {format_seconds(total)} | | | | |")
    return lines


def command_lines(records: Mapping[str, StageRecord]) -> list[str]:
    commands = {records[s].command for s in STAGES[:-1]}
    if len(commands) == 1:
        return ["    " + commands.pop()]
    return [f"- {s}: `{records[s].command}`" for s in STAGES[:-1]]


def render_report(plan: Plan, records: Mapping[str, StageRecord], results: Mapping[str, Any],
                  comparison: Mapping[str, Any], table: str) -> str:
    lines = [
        f"# CFGRL reproduction: {plan.task}, {plan.goal_mode} goals, scale `{plan.scale.name}`",
        "",
        f"Scale: {plan.scale.description}.",
        "",
        "## Headline",
        "",
        *comparison_lines(plan, comparison),
        "",
        "## Success rate (%) against w",
        "",
        "95% Wilson intervals in brackets; overall = mean over tasks.",
        "",
        table,
        "",
        "![success rate against w](success_vs_w.png)",
        "",
        "## What ran",
        "",
        *run_lines(plan, records, results),
        "",
        "Command:",
        "",
        *command_lines(records),
        "",
        "Stages:",
        "",
        *stage_table(records),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfgrl-reproduce", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="OGBench visual manipulation task")
    parser.add_argument("--goal-mode", default="oracle", choices=GOAL_MODES,
                        help="oracle: the paper's -oraclerep goal vectors; image: goal images")
    parser.add_argument("--scale", required=True,
                        help=f"one of {available_scales()} (config/reproduce/) or a YAML file's path")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory; default runs/repro-<task>-<goal mode>-<scale>")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the dataset goes (default <out>/data); share it between runs")
    parser.add_argument("--workers", type=int, default=None,
                        help="generation and evaluation processes (default: the scale's)")
    parser.add_argument("--device", default="auto", help="training and evaluation device: auto, cpu, cuda, cuda:N")
    parser.add_argument("--backend", default="torch", help="evaluation engine (cfgrl_ros.engines), default torch")
    parser.add_argument("--redo", nargs="+", default=[], choices=STAGES, metavar="STAGE",
                        help=f"discard these stages' work and run them again (any of {', '.join(STAGES)})")
    parser.add_argument("--until", default="report", choices=STAGES, help="stop after this stage")
    return parser


def plan_from_args(argv: list[str]) -> tuple[Plan, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 0:
        raise ReproduceError(f"--workers must be >= 0, got {args.workers}")
    scale = load_scale(args.scale)
    out = args.out or Path("runs") / f"repro-{args.task}-{args.goal_mode}-{scale.name}"
    command = "python -m training.reproduce " + shlex.join(argv)
    plan = Plan(args.task, args.goal_mode, scale, out, args.data_dir or out / "data", resolve_device(args.device),
                args.backend, args.workers, command)
    return plan, args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    errors = (ReproduceError, *GENERATION_ERRORS, DatasetError, CheckpointError, TrainError, EvaluationError)
    try:
        plan, args = plan_from_args(argv)
        records = reproduce(plan, tuple(args.redo), args.until)
    except errors as error:
        sys.exit(f"cfgrl-reproduce: error: {error}")
    if "report" in records:
        report = plan.stage_dir("report") / "report.md"
        print(report.read_text())
        print(f"report: {report}")
    else:
        print(f"stopped after {args.until}: {plan.stage_dir(args.until)}")


if __name__ == "__main__":
    main()
