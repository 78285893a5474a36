"""The configuration's schema: one dataclass per YAML section, each field with its default and help.

`Config` is the whole tree. The `model` section (`ModelConfig`) lives in `vall_e.config.model`, beside
the network config (`VALLEConfig`) whose fields it shares. The run paths (`ckpt/`, `logs/`, `.cache/`,
`data.h5`, `metrics.png`, `symmap.json`) hang off `cfg_path`, the YAML's folder, as in the reference
implementation. How a YAML file and `key=value` overrides become a `Config` is `vall_e.config.loading`'s
job.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vall_e.config.fields import setting as _f
from vall_e.config.model import ModelConfig


@dataclass
class DatasetConfig:
    training: list[str] = _f([], "speaker folders ({group}/{speaker}/) used for training, relative to the YAML's folder")
    validation: list[str] = _f([], "speaker folders for validation; empty = hold out validation_fraction of training")
    noise: list[str] = _f([], "folders of noise clips (reserved for noise-augmentation tasks)")
    validation_fraction: float = _f(0.05, "share of each speaker's utterances held out when `validation` is empty")
    speaker_name_format: str = _f("{group}_{speaker}", "speaker key from path parts: {group} = folder above the speaker folder, {speaker} = speaker folder")
    speaker_languages: dict[str, list[str]] = _f({}, "language code -> list of group names spoken in it")
    language: str = _f("en", "language of groups not listed in speaker_languages")
    hdf5_name: str = _f("data.h5", "HDF5 file name under the YAML's folder")
    use_hdf5: bool = _f(False, "read samples from the HDF5 file instead of the folders")
    validate: bool = _f(True, "filter training utterances by duration_range and phones_range")
    workers: int = _f(0, "DataLoader worker processes")
    phones_range: list[int] = _f([4, 512], "allowed phoneme count (including <s> and </s>)")
    duration_range: list[float] = _f([1.0, 32.0], "allowed duration in seconds")
    min_utterances: int = _f(2, "drop speakers with fewer utterances")
    random_utterance: float = _f(1.0, "probability the prompt comes from another utterance of the speaker (and of adding another piece)")
    max_prompts: int = _f(3, "most utterances joined into one prompt")
    prompt_duration: float = _f(3.0, "target prompt length in seconds (±1 s jitter); 0 = whole utterance")
    sample_type: str = _f("speaker", "how an index maps to an utterance: path | speaker | group")


@dataclass
class HyperparametersConfig:
    batch_size: int = _f(8, "utterances per micro-batch (when frames_per_batch is 0)")
    frames_per_batch: int = _f(0, "padded-frame budget per micro-batch for length bucketing; 0 = fixed batch_size")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    gradient_clipping: float = _f(100.0, "clip the gradient norm to this; 0 = off")
    optimizer: str = _f("adamw", "adamw | sgd | prodigy | adamw8bit")
    optimizer_params: dict[str, Any] = _f({}, "extra optimizer keyword arguments")
    learning_rate: float = _f(3.25e-4, "peak learning rate (Prodigy: its d_coef)")
    betas: list[float] = _f([0.9, 0.96], "AdamW betas (the reference's)")
    eps: float = _f(1e-7, "AdamW epsilon (the reference's)")
    weight_decay: float = _f(0.01, "AdamW weight decay (the reference's)")
    scheduler: str = _f("cosine", "constant | cosine | linear | onecycle")
    warmup_steps: int = _f(0, "linear warm-up steps")
    min_lr_ratio: float = _f(0.1, "cosine/linear schedules end at learning_rate * this")
    schedule_clock: str = _f("steps", "steps | time: with `time` and trainer.max_minutes, the schedule's position is "
                             "the larger of the steps done and the share of the time budget spent, so the "
                             "schedule finishes when the budget ends it")


@dataclass
class EvaluationConfig:
    batch_size: int = _f(16, "validation batch size")
    frequency: int = _f(250, "evaluate every N steps; 0 = never")
    size: int = _f(16, "validation utterances per evaluation")
    steps: int = _f(500, "longest AR output while synthesizing evaluation samples")
    synthesize: int = _f(2, "validation and training samples synthesized to wavs per evaluation")
    ar_temperature: float = _f(0.95, "AR temperature for evaluation samples")
    nar_temperature: float = _f(0.2, "NAR temperature for evaluation samples")


@dataclass
class DeepSpeedConfig:
    zero_optimization_level: int = _f(0, "ZeRO stage (0-3)")
    use_compression_training: bool = _f(False, "DeepSpeed 8-bit compression training")
    compression_bits: int = _f(8, "bits for compression training")
    offload: bool = _f(False, "ZeRO CPU offload of optimizer state and parameters")
    config: dict[str, Any] = _f({}, "extra DeepSpeed config merged on top of the generated one")


@dataclass
class TrainerConfig:
    backend: str = _f("local", "local (also DDP under torchrun) | deepspeed")
    iterations: int = _f(100_000, "stop at this optimizer step")
    max_minutes: float = _f(0.0, "also stop (saving first) after this many minutes of training; 0 = no limit")
    save_frequency: int = _f(100, "save a checkpoint every N steps; 0 = evaluation.frequency")
    keep_last_checkpoints: int = _f(4, "keep this many checkpoints; 0 = all")
    save_on_quit: bool = _f(True, "`quit`, SIGINT and SIGTERM save before exiting")
    export_on_save: bool = _f(False, "also export model.safetensors on every save")
    export_on_quit: bool = _f(False, "export model.safetensors on quit")
    load_tag: str = _f("", "checkpoint step to resume from; empty = `latest`")
    load_state_dict: bool = _f(False, "start from ckpt/{name}/model.safetensors instead of a training checkpoint")
    load_states: bool = _f(True, "restore optimizer, scheduler and sampler states on resume")
    strict_loading: bool = _f(True, "require every weight to match when loading")
    restart_step_count: bool = _f(False, "reset the step and token counters after loading")
    medusa_only: bool = _f(False, "train only the Medusa heads (model.medusa_heads) on a trained AR: the rest is "
                                  "frozen, and heads missing from the loaded weights start as the AR head")
    weight_dtype: str = _f("float32", "float32 | bfloat16 | float16: mixed-precision compute dtype")
    amp: bool = _f(True, "autocast to weight_dtype (weights stay fp32) when weight_dtype is not float32")
    activation_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    check_for_oom: bool = _f(True, "skip and count out-of-memory batches instead of crashing (GPU)")
    log_frequency: int = _f(1, "write a metrics line every N steps")
    tensorboard: bool = _f(True, "also log to TensorBoard when it is installed")
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, metadata={"help": "DeepSpeed settings"})


@dataclass
class InferenceConfig:
    weight_dtype: str = _f("float32", "float32 | bfloat16 | float16 for inference")
    max_ar_steps: int = _f(0, "hard cap on AR steps; 0 = follow the text length")
    compile: bool = _f(False, "torch.compile the AR decode step")
    vocoder: str = _f("", "decode EnCodec codes with: vocos | encodec | a Vocos folder | '' (the model's default: "
                          "vocos for VALL-E X)")


@dataclass
class CodecConfig:
    name: str = _f("encodec", "encodec | world (offline, no download)")
    model: str = _f("facebook/encodec_24khz", "EnCodec hub id or local folder")
    bandwidth: float = _f(6.0, "EnCodec bandwidth in kbps (6.0 = 8 levels)")
    codebooks: str = _f("", "offline codec's fitted codebooks (safetensors); relative to the YAML's folder")
    device: str = _f("cpu", "device the codec runs on")


@dataclass
class BitsAndBytesConfig:
    enabled: bool = _f(False, "use bitsandbytes (8-bit optimizers and linear layers)")
    linear: bool = _f(False, "swap the backbone's linear layers (bitsandbytes 8-bit, or BitLinear with bitnet)")
    bitnet: bool = _f(False, "with `linear`: use BitNet b1.58 BitLinear layers (no bitsandbytes needed)")


class _RunPath:
    """A read-only `Config` attribute: a fixed name under the run's folder (`cfg_path`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, cfg: Any, owner: type | None = None) -> Any:
        return self if cfg is None else cfg.cfg_path / self.name

    def __set__(self, cfg: Any, value: Any) -> None:
        raise AttributeError(f"{self.name} is a run path under cfg_path; set cfg_path instead")


@dataclass
class Config:
    device: str = _f("auto", "auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    seed: int = _f(0, "random seed")
    dataset: DatasetConfig = field(default_factory=DatasetConfig, metadata={"help": "data"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model architecture"})
    hyperparameters: HyperparametersConfig = field(default_factory=HyperparametersConfig, metadata={"help": "optimisation"})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"help": "evaluation during training"})
    trainer: TrainerConfig = field(default_factory=TrainerConfig, metadata={"help": "training loop"})
    inference: InferenceConfig = field(default_factory=InferenceConfig, metadata={"help": "inference"})
    codec: CodecConfig = field(default_factory=CodecConfig, metadata={"help": "audio codec"})
    bitsandbytes: BitsAndBytesConfig = field(default_factory=BitsAndBytesConfig, metadata={"help": "quantised layers"})
    cfg_path: Path = field(default=Path("data"), metadata={"help": "root of run paths; set from the YAML's folder"})

    # ----- run paths, all under the YAML's folder as in the reference -----
    ckpt_dir = _RunPath("ckpt")
    log_dir = _RunPath("logs")
    cache_dir = _RunPath(".cache")
    metrics_path = _RunPath("metrics.png")
    symmap_path = _RunPath("symmap.json")

    @property
    def hdf5_path(self) -> Path:
        return self.cfg_path / self.dataset.hdf5_name

    def resolve_path(self, p: str | Path) -> Path:
        """A path from the config, relative to the YAML's folder unless absolute."""
        p = Path(p)
        return p if p.is_absolute() else self.cfg_path / p

    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch  # here, not at the top: reading a config (python -m vall_e.config) needs no torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cfg_path"] = str(self.cfg_path)
        return d
