"""The FineTuneJob API (kubetune.io/v1alpha1): the single source of truth.

The CRD's OpenAPI schema is generated from these models (`kubetune crd`), the
operator validates and renders from them, and the trainer reads the resolved
config built from them. Field names are camelCase on the wire (aliases) and
snake_case in Python.

Cross-field rules that the API server can check live here as CEL rules
(`x-kubernetes-validations`, via `json_schema_extra`); rules it cannot check are
in `kubetune.api.validation`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from kubetune.api.rules import EVALUATION_RULES, SPEC_RULES, cel_validations

GROUP: Final = "kubetune.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "kubetune.io/v1alpha1"
KIND: Final = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]


class ApiModel(BaseModel):
    """Base: camelCase aliases, unknown fields refused, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict a user would write in YAML (defaults included, None dropped)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules for `x-kubernetes-validations`: (rule, message) pairs."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


# A subset of Kubernetes' own types that the pod template accepts unchanged.
# They are passed through as plain objects (x-kubernetes-preserve-unknown-fields)
# so that users can write anything the core API accepts there.
PRESERVE: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}

# A bounded string: the API server estimates the cost of CEL rules from maxLength,
# so every string a rule may compare carries one.
Name = Annotated[str, Field(min_length=1, max_length=256)]


# A URI the trainer reads data from. `s3://` needs a bucket (`s3:///x` has none).
DATA_URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|pvc://[a-z0-9][a-z0-9\-.]*(/.*)?|file://.+|/.+|hf://[^\s]+)$"
# A Kubernetes resource quantity, as the API server parses it (e.g. 8, 500m, 64Gi, 1e3).
QUANTITY = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
Quantity = Annotated[str, Field(max_length=64, pattern=QUANTITY)]

# --------------------------------------------------------------------- model


class QuantizationSpec(ApiModel):
    """k-bit loading of the frozen base model (QLoRA) through bitsandbytes."""

    bits: Literal[4, 8] = 4
    """4-bit (QLoRA) or 8-bit (LLM.int8) weights."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: `nf4` (NormalFloat, as in the QLoRA paper) or `fp4`."""
    double_quant: bool = True
    """Quantize the quantization constants too (about 0.4 bits per weight saved)."""


class ModelSpec(ApiModel):
    """Which pretrained model to start from."""

    source: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|hf://[^\s]+|pvc://[a-z0-9][a-z0-9\-.]*(/.*)?|file://.+|/.+)$",
    )
    """Where the model is: `s3://bucket/prefix`, `pvc://claim/path`, an absolute local path (or `file://`), or `hf://org/name` where the cluster reaches the Hugging Face hub."""
    revision: str | None = Field(default=None, max_length=256)
    """Revision (branch, tag or commit) for `hf://` sources."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype to load the weights in; `auto` picks bfloat16 on GPUs that support it and float32 on CPU."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Only for sources you trust."""
    quantization: QuantizationSpec | None = None
    """QLoRA: load the frozen base quantized (bitsandbytes, on CUDA or CPU) and train a LoRA/DoRA adapter on it."""


# ------------------------------------------------------------------- dataset


# Column and key names tried, in order, when a `fields` entry is left unset (`auto`).
FIELD_ALIASES: Final[dict[str, tuple[str, ...]]] = {
    "messages": ("messages", "conversations"),
    "role": ("role", "from"),
    "content": ("content", "value"),
    "instruction": ("instruction",),
    "input": ("input", "context"),
    "response": ("output", "response", "answer"),
    "prompt": ("prompt",),
    "completion": ("completion",),
    "text": ("text",),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
}

# Role names understood without a `fields.roles` entry (ShareGPT's human/gpt included).
DEFAULT_ROLES: Final[dict[str, str]] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


class FieldMapping(ApiModel):
    """Column and key names in the dataset. Unset entries try their common names (see the manual's Datasets page)."""

    messages: str | None = Field(default=None, max_length=256)
    """Column with the list of chat messages (format `chat`); unset tries `messages`, then `conversations` (ShareGPT)."""
    role: str | None = Field(default=None, max_length=256)
    """Key of a message's role; unset tries `role`, then `from` (ShareGPT)."""
    content: str | None = Field(default=None, max_length=256)
    """Key of a message's text; unset tries `content`, then `value` (ShareGPT)."""
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(default_factory=dict, max_length=64)
    """Role names in the data mapped to system, user or assistant, added to the built-in ones (system, user, human, assistant, gpt). Assistant turns are learned."""
    instruction: str | None = Field(default=None, max_length=256)
    """Column with the instruction (format `instruction`); unset: `instruction`."""
    input: str | None = Field(default=None, max_length=256)
    """Optional column appended to the instruction (format `instruction`); unset tries `input`, then `context`."""
    response: str | None = Field(default=None, max_length=256)
    """Column with the response to learn (format `instruction`); unset tries `output`, `response`, then `answer`."""
    prompt: str | None = Field(default=None, max_length=256)
    """Column with the prompt (formats `prompt_completion` and `preference`); unset: `prompt`."""
    completion: str | None = Field(default=None, max_length=256)
    """Column with the completion to learn (format `prompt_completion`); unset: `completion`."""
    text: str | None = Field(default=None, max_length=256)
    """Column with plain text, every token learned (format `text`); unset: `text`."""
    chosen: str | None = Field(default=None, max_length=256)
    """Column with the preferred response (format `preference`); unset: `chosen`."""
    rejected: str | None = Field(default=None, max_length=256)
    """Column with the dispreferred response (format `preference`); unset: `rejected`."""

    def names(self, key: str) -> tuple[str, ...]:
        """The column names tried for `key`: the one set, or the common ones."""
        value = getattr(self, key)
        return (value,) if value else FIELD_ALIASES[key]


DatasetFormat = Literal["auto", "chat", "instruction", "prompt_completion", "text", "preference"]


class DatasetSource(ApiModel):
    """One of several training datasets mixed together (`dataset.sources`)."""

    path: str = Field(min_length=1, max_length=2048, pattern=DATA_URI)
    """A file, a directory of shards, or a dataset saved with `datasets`' save_to_disk, at `s3://`, `pvc://`, a local path or `hf://`."""
    weight: float = Field(default=1.0, gt=0, le=100)
    """How much of this source one epoch holds, relative to its size: 2 repeats every example twice, 0.5 takes a seeded half."""
    format: DatasetFormat | None = None
    """Record format of this source; unset: `dataset.format`."""
    fields: FieldMapping | None = None
    """Column names of this source; unset: `dataset.fields`."""


class DatasetSpec(ApiModel):
    """Training (and evaluation) data."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "has(self.train) != (has(self.sources) && size(self.sources) > 0)",
                "set exactly one of spec.dataset.train (one dataset) or spec.dataset.sources (several, mixed with weights)",
            )
        )
    )

    train: str | None = Field(default=None, min_length=1, max_length=2048, pattern=DATA_URI)
    """Training data: a JSONL, JSON, CSV/TSV or Parquet file, a directory of such shards, or a dataset saved with `datasets`' save_to_disk, at `s3://`, `pvc://`, a local path or `hf://` (a dataset repository)."""
    sources: list[DatasetSource] = Field(default_factory=list, max_length=64)
    """Several training datasets mixed with weights, instead of `train`."""
    eval: str | None = Field(default=None, max_length=2048, pattern=DATA_URI)
    """Optional evaluation data, same forms as `train`. Without it, `evalSplit` holds out part of the training data."""
    format: DatasetFormat = "auto"
    """Record format; `auto` detects it from the columns of the first record."""
    fields: FieldMapping = Field(default_factory=FieldMapping)
    """Column and key names, where they differ from the common ones."""
    max_seq_length: int = Field(default=1024, ge=16, le=131072)
    """Longest tokenized example; what happens to longer ones is `overflow`."""
    overflow: Literal["truncate", "drop", "error"] = "truncate"
    """Examples longer than maxSeqLength: `truncate` them, `drop` them, or refuse the dataset (`error`). Counts go to the log and metrics.json."""
    max_invalid_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of records with an empty or null response, a missing cell or nothing to learn that is skipped; above it the dataset is refused."""
    max_record_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    """Largest single record (a JSONL line, a CSV row); a larger one refuses the dataset, naming file and line."""
    packing: bool = False
    """Pack several examples into one sequence (attention never crosses example boundaries)."""
    eval_split: float = Field(default=0.0, ge=0.0, le=0.5)
    """Fraction of the training data held out for evaluation when `eval` is not given."""

    def train_sources(self) -> list[DatasetSource]:
        """`sources`, or `train` as a single source of weight 1."""
        if self.sources:
            return list(self.sources)
        return [DatasetSource(path=self.train or "")]

    @model_validator(mode="after")
    def _one_training_input(self) -> DatasetSpec:
        if bool(self.train) == bool(self.sources):
            raise ValueError(
                "set exactly one of spec.dataset.train (one dataset) or spec.dataset.sources (several, mixed with weights)"
            )
        return self


# -------------------------------------------------------------------- method


class LoraSpec(ApiModel):
    """LoRA adapter settings (method `lora`)."""

    r: int = Field(default=16, ge=1, le=1024)
    """Rank of the adapter matrices."""
    alpha: float = Field(default=32.0, gt=0)
    """Scaling numerator (the update is scaled by alpha/r)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: list[Name] = Field(default_factory=lambda: ["all-linear"], min_length=1, max_length=64)
    """Module names to adapt, or `all-linear` for every linear layer but the output head."""
    modules_to_save: list[Name] = Field(default_factory=list, max_length=64)
    """Modules trained in full and saved with the adapter (e.g. `embed_tokens`, `lm_head`)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale the update by alpha/sqrt(r) instead of alpha/r (helps at high ranks)."""
    rank_pattern: dict[str, Annotated[int, Field(ge=1, le=1024)]] = Field(default_factory=dict, max_length=64)
    """Per-module ranks that override `r`: module name or regex -> rank (e.g. {down_proj: 32})."""
    alpha_pattern: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict, max_length=64)
    """Per-module alphas that override `alpha`: module name or regex -> alpha."""
    loraplus_lr_ratio: float | None = Field(default=None, ge=1.0, le=1024.0)
    """LoRA+: the B matrices learn at this multiple of the learning rate (the paper suggests 16); unset: one rate."""


class PromptTuningSpec(ApiModel):
    """Prompt tuning settings (method `prompt_tuning`): trained virtual tokens before every input."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=1024)
    """Virtual tokens prepended to each sequence."""
    init_text: str | None = Field(default=None, min_length=1, max_length=4096)
    """Initialise the virtual tokens from this text's embeddings (e.g. a task description); unset: random."""


class PrefixTuningSpec(ApiModel):
    """Prefix tuning settings (method `prefix_tuning`): trained key/value prefixes in every layer."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=1024)
    """Prefix length (key/value positions per layer)."""
    projection: bool = False
    """Reparameterise the prefix through a two-layer MLP while training (more stable, more memory)."""
    encoder_hidden_size: int | None = Field(default=None, ge=1, le=65536)
    """Hidden size of that MLP (with `projection`); unset: the model's hidden size."""


class Ia3Spec(ApiModel):
    """IA3 settings (method `ia3`): learned vectors that rescale keys, values and feed-forward activations."""

    target_modules: list[Name] = Field(default_factory=list, max_length=64)
    """Modules to rescale; empty: peft's defaults for the architecture (Llama: k_proj, v_proj, down_proj)."""
    feedforward_modules: list[Name] = Field(default_factory=list, max_length=64)
    """Which of `targetModules` are feed-forward layers (their input is scaled, not their output); needed with `targetModules`."""


class FreezeSpec(ApiModel):
    """Partial fine-tuning: which parameters stay frozen."""

    first_n_layers: int | None = Field(default=None, ge=0, le=1024)
    """Freeze the embeddings and the first N transformer blocks."""
    trainable_modules: list[Name] = Field(default_factory=list, max_length=256)
    """Train only parameters whose name contains one of these strings; everything else is frozen."""


# ------------------------------------------------------------------ training


class EarlyStoppingSpec(ApiModel):
    """Stop when the evaluation metric stops improving."""

    patience: int = Field(default=3, ge=1, le=1000)
    """Evaluations without improvement before training stops."""
    metric: Literal["eval_loss"] = "eval_loss"
    """Metric watched (lower is better)."""
    min_delta: float = Field(default=0.0, ge=0.0)
    """Smallest decrease that counts as an improvement."""


class TrainingSpec(ApiModel):
    """Optimisation settings."""

    epochs: float = Field(default=1.0, gt=0, le=1000)
    """Passes over the training data (ignored when `maxSteps` is set)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Total optimizer steps; overrides `epochs`."""
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0)
    """Peak learning rate."""
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(default=0.03, ge=0.0, le=1.0)
    """Fraction of steps spent warming up (ignored when `warmupSteps` is set)."""
    warmup_steps: int | None = Field(default=None, ge=0)
    """Warmup steps; overrides `warmupRatio`."""
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    """Gradient clipping norm; 0 disables clipping."""
    per_device_batch_size: int = Field(default=1, ge=1, le=4096)
    """Sequences per process per micro-step."""
    global_batch_size: int | None = Field(default=None, ge=1, le=1048576)
    """Sequences per optimizer step across all processes; must be a multiple of perDeviceBatchSize x world size. Gradient accumulation = global / (perDevice x world size). Unset: no accumulation."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute precision; `auto` is bf16 on GPUs that support it, fp32 on CPU."""
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    """Random seed (model init of new modules, data order, dropout)."""
    logging_steps: int = Field(default=10, ge=1)
    """Log loss and progress every N steps."""
    eval_steps: int | None = Field(default=None, ge=1)
    """Evaluate every N steps (and at the end); unset: only at the end of each epoch."""
    early_stopping: EarlyStoppingSpec | None = None
    """Stop early when evaluation stops improving (needs evaluation data)."""
    eval_generation_samples: int = Field(default=0, ge=0, le=10000)
    """Held-out examples answered greedily before and after training to report exact-match accuracy in metrics.json (0: off)."""
    layer_lr_decay: float | None = Field(default=None, gt=0.0, le=1.0)
    """Discriminative learning rates (method `full`): block i of N learns at learningRate x decay^(N-i); embeddings at decay^(N+1). Unset: one rate."""
    head_learning_rate: float | None = Field(default=None, gt=0, le=1.0)
    """Learning rate for the output head and other newly added or unfrozen heads (`lm_head`, `score`, LoRA's modulesToSave); unset: learningRate."""
    neftune_alpha: float | None = Field(default=None, gt=0.0, le=100.0)
    """NEFTune: add uniform noise of scale alpha/sqrt(sequence length x hidden size) to the input embeddings while training (5 is typical); unset: off."""


# ----------------------------------------------------------------- objective


class DpoSpec(ApiModel):
    """Direct Preference Optimization settings (objective `dpo`)."""

    beta: float = Field(default=0.1, gt=0.0, le=100.0)
    """Strength of the pull towards the reference model (higher: stay closer)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """`sigmoid` (the DPO paper), `ipo`, `hinge` (SLiC) or `robust` (noisy-label robust DPO, with labelSmoothing)."""
    label_smoothing: float = Field(
        default=0.0, ge=0.0, le=0.49
    )  # not lt=0.5: the API server checks the default 0 against an exclusive 0.5 cast to an integer, and refused the CRD
    """Assumed probability that a preference label is flipped (conservative DPO for `sigmoid`, and `robust`)."""
    reference_model: Literal["frozen-copy", "none"] = "frozen-copy"
    """`frozen-copy`: the starting model is the reference (with an adapter method, the frozen base itself, adapters off: no second copy); `none`: reference-free."""


# --------------------------------------------------------------- distributed


class NetworkCheckSpec(ApiModel):
    """The gang's network check: before training starts (and after each restart), every pod first checks that rank 0's rendezvous port answers, then the ranks time a ring of point-to-point messages and one all-reduce over the training backend (NCCL on GPU, gloo on CPU)."""

    enabled: bool = True
    """Run the check (false: none; a peer that cannot be reached then hangs the rendezvous until torchrun's own timeout)."""
    megabytes: int = Field(default=4, ge=1, le=1024)
    """Size of the all-reduce and of each point-to-point message that measure bandwidth (latency is measured with 4-byte messages)."""
    timeout_seconds: int = Field(default=20, ge=5, le=600)
    """How long a pod may fail to reach a peer (connections timing out or refused by the route, not a peer still starting) before the gang fails with reason NetworkUnreachable, naming both pods and the port."""


class DistributedSpec(ApiModel):
    """How many processes train together and how they share the work."""

    nodes: int = Field(default=1, ge=1, le=1024)
    """Pods (machines) in the gang; one torchrun per pod."""
    procs_per_node: int = Field(default=1, ge=1, le=64)
    """Processes per pod: GPUs per node on GPU nodes (each process gets one), CPU processes otherwise."""
    gpus_per_node: int = Field(default=0, ge=0, le=64)
    """GPUs requested per pod (`nvidia.com/gpu`); 0 trains on CPU. When > 0 it must equal procsPerNode."""
    backend: Literal["auto", "ddp", "deepspeed"] = "auto"
    """`ddp`, `deepspeed` (ZeRO), or `auto`: DDP when the model and optimizer fit one device, else DeepSpeed."""
    zero_stage: int = Field(default=2, ge=1, le=3)
    """DeepSpeed ZeRO stage (1, 2 or 3)."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state in CPU memory."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3: keep parameters in CPU memory."""
    node_loss_toleration_seconds: int = Field(default=60, ge=30, le=3600)
    """How long the gang's pods stay bound to a node that stopped answering (NotReady or unreachable) before Kubernetes evicts them and the operator restarts the gang from its newest complete checkpoint: the pods tolerate `node.kubernetes.io/not-ready` and `node.kubernetes.io/unreachable` (NoExecute) for this long instead of the cluster's default 300 s. 30 to 3600: below 30 s a node that flaps restarts the gang over and over. A toleration for either key in `spec.tolerations` takes precedence."""
    min_nodes: int | None = Field(default=None, ge=1, le=1024)
    """Elastic resume: the fewest nodes the gang may train on. When some of the gang's pods stay unschedulable for `elasticWaitSeconds` (a node lost, or not enough nodes free), the operator restarts the gang from its newest complete checkpoint on as many nodes as it could place (at least `minNodes`), with the same global batch (gradient accumulation raised to match) and the same data order; each later restart tries all `nodes` again. Between 1 and `nodes`. A node count at which the global batch (`training.globalBatchSize`, or perDeviceBatchSize x nodes x procsPerNode when unset) does not divide evenly is skipped. Checkpoints load at the new size with DDP, and with DeepSpeed ZeRO 1-3 without offload (through DeepSpeed's universal checkpoint). Unset: the gang always trains on `nodes` nodes."""
    elastic_wait_seconds: int = Field(default=180, ge=30, le=3600)
    """With `minNodes`: how long pods of the gang may stay unschedulable before it restarts on fewer nodes. 30 to 3600."""
    spread: Literal["nodes", "none"] = "nodes"
    """`nodes`: a topology spread constraint over `kubernetes.io/hostname` (maxSkew 1, DoNotSchedule, tainted nodes not counted) puts the gang's pods on as many nodes as possible, one per node when there are enough, so one node's loss costs at most its own pods. `none`: placement is left to the scheduler (and to `affinity`)."""
    network_check: NetworkCheckSpec = Field(default_factory=NetworkCheckSpec)
    """The network check before training: reachability of rank 0's rendezvous port, then bandwidth and latency per pair of ranks and of one all-reduce (status.network, metrics.json)."""

    @property
    def world_size(self) -> int:
        """Processes that train together on all `nodes`: nodes x procsPerNode (torchrun's WORLD_SIZE)."""
        return self.nodes * self.procs_per_node

    @property
    def elastic(self) -> bool:
        """Whether the gang may train on fewer than `nodes` nodes (minNodes below nodes)."""
        return self.min_nodes is not None and self.min_nodes < self.nodes


# -------------------------------------------------------------- output/storage

# registry/repository:tag, the registry named explicitly (a host with a dot or a port, or localhost).
OCI_REFERENCE = (
    r"^((localhost|[a-zA-Z0-9-]+(\.[a-zA-Z0-9-]+)+)(:[0-9]+)?|[a-zA-Z0-9-]+:[0-9]+)"
    r"/[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
)


class PublishSpec(ApiModel):
    """Where the finished model is published besides the output URI: an OCI registry, a Hugging Face Hub repository, or both."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "has(self.oci) || has(self.huggingface)",
                "set spec.output.publish.oci, spec.output.publish.huggingface or both",
            )
        )
    )

    oci: str | None = Field(default=None, max_length=512, pattern=OCI_REFERENCE)
    """`registry/repository:tag`: rank 0 pushes the merged model (or the adapter) there as an OCI artifact with the CNCF ModelPack media types, after the artifacts are written; status.artifacts.oci gets the digest-pinned reference `registry/repository@sha256:...`."""
    credentials_secret: str | None = Field(default=None, min_length=1, max_length=253)
    """A `kubernetes.io/dockerconfigjson` Secret in the job's namespace with an `auths` entry for the registry; mounted read-only into rank 0's pod, never put in env or logs. Unset: push without credentials."""
    plain_http: bool = Field(default=False, alias="plainHTTP")
    """Talk to the registry over plain HTTP (a test registry on loopback or inside the cluster); default HTTPS."""
    artifact: Literal["model", "adapter"] | None = None
    """What to push: `model` (the merged or fully fine-tuned weights, with the tokenizer) or `adapter` (the PEFT adapter alone). Unset: the model where the job writes one, else the adapter."""
    huggingface: HuggingFacePublish | None = None
    """Also push the model (or adapter) and its model card to a Hugging Face Hub repository."""


class HuggingFacePublish(ApiModel):
    """A Hugging Face Hub model repository the finished model and its card are pushed to."""

    repo: str = Field(
        min_length=3, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$"
    )
    """`org/name` of the model repository; created when it does not exist."""
    token_secret: str = Field(min_length=1, max_length=253)
    """A Secret in the job's namespace with the key `HF_TOKEN` (a write token); given to rank 0 as env from the Secret, never in the ConfigMap or logs."""
    private: bool = True
    """Create the repository private (an existing repository keeps its visibility)."""
    endpoint: str | None = Field(default=None, max_length=2048, pattern=r"^https?://.+")
    """The Hub's address (a self-hosted Hub-compatible server); unset: huggingface.co (or $HF_ENDPOINT)."""


SelectMetric = Literal["evalLoss", "perplexity", "retainLoss", "forgetting", "exactMatch", "generationPass"]
"""Figures a model is compared by (losses, perplexity and forgetting: lower is better; the rest: higher)."""


class CardSpec(ApiModel):
    """What the model card says beyond what the job measures (its Hub metadata)."""

    license: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9.+-]*$")
    """The model's license as a Hub license id (e.g. `apache-2.0`, `llama3.1`, `other`)."""
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=32
    )
    """Extra Hub tags (`kubetune` and the method are always there)."""
    language: list[Annotated[str, Field(min_length=2, max_length=16)]] = Field(
        default_factory=list, max_length=32
    )
    """Languages of the data (ISO 639-1 codes)."""


class OutputSpec(ApiModel):
    """Where artifacts go."""

    uri: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|pvc://.+|file://.+|/.+)$",
    )
    """Artifacts prefix: `s3://bucket/prefix`, `pvc://claim/path` or a local path. The job writes under `<uri>/` checkpoints/, adapter/, merged/, metrics.json and manifest.json."""
    merge_adapter: bool | None = None
    """For adapter methods: also write the adapter merged into the base weights (safetensors). Unset: merge where peft can (lora, dora, ia3; not prompt or prefix tuning)."""
    checkpoint_steps: int = Field(default=100, ge=1)
    """Save a resumable checkpoint every N steps (and on SIGTERM)."""
    keep_checkpoints: int = Field(default=2, ge=1, le=100)
    """Complete checkpoints kept; older ones are deleted."""
    resume_from: Literal["fresh", "previous"] = "fresh"
    """An edit of what is trained after the job finished starts a new run, written under `<uri>/run-<n>/`: `fresh` trains from the model again, `previous` resumes from the previous run's newest checkpoint (weights, optimizer, step)."""
    publish: PublishSpec | None = None
    """Also publish the finished model to an OCI registry (see PublishSpec)."""
    card: CardSpec = Field(default_factory=CardSpec)
    """Hub metadata for the model card's YAML front matter (license, tags, languages)."""
    interpolate: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(default_factory=list, max_length=16)
    """WiSE-FT: weight mixes alpha x fine-tuned + (1 - alpha) x base to write under `<uri>/interpolation/alpha-<a>/` and evaluate on the eval and retain sets (e.g. [0.25, 0.5, 0.75]); the table goes to metrics.json. Needs full weights (a full fine-tune or a merged adapter)."""
    select: Literal["fineTuned", "best"] = "fineTuned"
    """Which model ends up in `<uri>/model/` (and is gated): `fineTuned` (alpha 1), or `best`: the mix (alpha 1 included) with the best `selectMetric`."""
    select_metric: SelectMetric = "evalLoss"
    """The figure `select: best` compares: evalLoss, perplexity, retainLoss, forgetting (lower is better), exactMatch or generationPass (higher is better)."""
    keep_mixes: bool = True
    """Upload every mix's weights under `<uri>/interpolation/`; false keeps only the table in metrics.json (and the selected mix in model/)."""

    @model_validator(mode="after")
    def _distinct_mixes(self) -> OutputSpec:
        if len(set(self.interpolate)) != len(self.interpolate):
            raise ValueError(f"spec.output.interpolate: list each alpha once (got {self.interpolate})")
        return self


class MlflowTracking(ApiModel):
    """An MLflow tracking server rank 0 reports the run to."""

    uri: str = Field(min_length=1, max_length=2048, pattern=r"^https?://.+")
    """The tracking server's address, e.g. `http://mlflow.mlops:5000`."""
    experiment: str = Field(min_length=1, max_length=256)
    """The experiment the run goes to (created when missing)."""
    run_name: str | None = Field(default=None, min_length=1, max_length=256)
    """The run's name; unset: `<job>` (`<job>-run-<n>` from the second run on)."""
    credentials_secret: str | None = Field(default=None, min_length=1, max_length=253)
    """A Secret with `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD`, or `MLFLOW_TRACKING_TOKEN`; given to rank 0 as env from the Secret, never in the ConfigMap or logs."""
    register_as: str | None = Field(default=None, min_length=1, max_length=256)
    """Registered model name: when the job succeeds and passes its evaluation gate, a new version of it points at the artifacts (the OCI reference when published, else the model's S3 URI)."""


class WandbTracking(ApiModel):
    """A Weights & Biases project rank 0 reports the run to."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.mode == 'offline' || has(self.apiKeySecret)",
                "mode online needs apiKeySecret (a Secret with the key WANDB_API_KEY); or set mode: offline",
            )
        )
    )

    project: str = Field(min_length=1, max_length=128)
    """The W&B project."""
    entity: str | None = Field(default=None, min_length=1, max_length=128)
    """The W&B team or user; unset: the API key's default entity."""
    api_key_secret: str | None = Field(default=None, min_length=1, max_length=253)
    """A Secret with the key `WANDB_API_KEY`; given to rank 0 as env from the Secret, never in the ConfigMap or logs. Needed for `online`."""
    mode: Literal["online", "offline"] = "online"
    """`online` streams to W&B; `offline` writes the run directory into the artifacts (`<uri>/wandb/`) for a later `wandb sync`."""
    base_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://.+")
    """A self-hosted W&B server; unset: W&B's cloud."""


class TrackingSpec(ApiModel):
    """Experiment trackers rank 0 reports to: hyper-parameters, every logged metric with its step, the model card."""

    mlflow: MlflowTracking | None = None
    """An MLflow tracking server (and its model registry)."""
    wandb: WandbTracking | None = None
    """Weights & Biases."""


class SecretKeyNames(ApiModel):
    """A Secret holding S3 credentials, and the keys in it."""

    name: str = Field(min_length=1, max_length=253)
    """Secret name, in the FineTuneJob's namespace."""
    access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    """Key holding the access key id."""
    secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"
    """Key holding the secret access key."""
    session_token_key: str | None = None
    """Optional key holding a session token."""


class StorageSpec(ApiModel):
    """S3 connection for model, data and artifacts. Credentials only by Secret reference."""

    endpoint: str | None = Field(default=None, max_length=2048, pattern=r"^https?://.+")
    """S3 endpoint URL for S3-compatible stores (MinIO, Ceph); unset for AWS."""
    region: str = Field(default="us-east-1", max_length=64)
    """S3 region."""
    secret_ref: SecretKeyNames | None = None
    """Secret with the access keys; unset uses the pod's ambient identity (IRSA, workload identity)."""
    path_style: bool = True
    """Path-style addressing (most S3-compatible stores need it)."""


# ---------------------------------------------------------------- run policy


class RunPolicy(ApiModel):
    """Restarts, deadlines, clean-up, admission."""

    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Whole-gang restarts after a failed rank before the job is Failed."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Wall-clock limit for the whole job; then it is Failed."""
    progress_deadline_seconds: int | None = Field(default=None, ge=10)
    """A rank that makes no optimizer step this long while training is Stalled: its Python stacks go to its log and `status.lastFailure`, and the gang restarts from the last checkpoint (counted against backoffLimit)."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the FineTuneJob this long after it succeeds or fails."""
    suspend: bool = False
    """Suspend: no pods run (set by you or by a queue such as Kueue); unsuspending resumes from the last checkpoint."""


# ----------------------------------------------------------------- scheduling


GangScheduler = Literal["coscheduling", "volcano", "kai"]


class GangSpec(ApiModel):
    """Gang scheduling: no pod of the job is bound until `minMember` of them can be, so a half-started gang never
    holds GPUs. kubetune creates the scheduler's PodGroup (owned by the job, one per job, kept across gang
    restarts) and points the pods at it."""

    scheduler: GangScheduler
    """`coscheduling` (kubernetes-sigs/scheduler-plugins: a scheduling.x-k8s.io/v1alpha1 PodGroup), `volcano`
    (a scheduling.volcano.sh/v1beta1 PodGroup) or `kai` (NVIDIA KAI Scheduler: a scheduling.run.ai/v2alpha2
    PodGroup). Its PodGroup CRD must be installed; the scheduler's own name goes to the pods' schedulerName
    unless spec.schedulerName says otherwise."""
    min_member: int | None = Field(default=None, ge=1, le=10000)
    """Pods that must be placeable together before any is bound; unset: every pod of the gang (distributed.nodes), or distributed.minNodes for an elastic job (so a gang that shrank can be placed)."""
    schedule_timeout_seconds: int | None = Field(default=None, ge=0, le=86400)
    """How long a partly placed gang may wait for the rest before the scheduler gives its pods up and retries
    (coscheduling's scheduleTimeoutSeconds; Volcano and KAI have no per-group timeout and ignore it)."""
    queue: str | None = Field(default=None, min_length=1, max_length=253)
    """The scheduler's queue (Volcano: a Queue; KAI: required, its queue name). Unset: Volcano's `default`."""


class SchedulingSpec(ApiModel):
    """How the gang is placed: a gang scheduler's PodGroup."""

    gang: GangSpec | None = None
    """Gang scheduling through a PodGroup (coscheduling, Volcano or KAI)."""


# -------------------------------------------------------------- pod settings


class LocalObjectReference(ApiModel):
    """A reference to an object in the same namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the object in the same namespace."""


class EnvVar(ApiModel):
    """An environment variable for the trainer container (as in a Pod)."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    """Variable name."""
    value: str | None = None
    """Literal value."""
    value_from: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """Source for the value, as in a Pod's `env[].valueFrom`."""


class CacheVolume(ApiModel):
    """A volume mounted into every training pod (model/dataset caches, PVCs with data)."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Volume name."""
    mount_path: str = Field(min_length=1, pattern=r"^/.*")
    """Where it is mounted in the container."""
    read_only: bool = False
    """Mount read-only."""
    source: dict[str, Any] = Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    """The volume source as in a Pod's `volumes[]` without `name` (e.g. `persistentVolumeClaim: {claimName: data}`)."""


class ScratchSpec(ApiModel):
    """The trainer's scratch space at $KUBETUNE_CACHE_DIR: model and dataset downloads, tokenized data, and
    checkpoints staged before their upload. An emptyDir on the node's disk unless `storageClassName` is set."""

    size: Quantity = "20Gi"
    """As an emptyDir: its sizeLimit and the pod's ephemeral-storage request (the scheduler places the pod where the
    disk fits; the kubelet evicts a pod that writes more). With storageClassName: each pod's claim. 1Gi to 64Ti;
    full fine-tuning stages whole checkpoints (weights and optimizer state) here, so size it for them."""
    storage_class_name: str | None = Field(default=None, min_length=1, max_length=253)
    """A StorageClass (e.g. local NVMe): the scratch space becomes a generic ephemeral volume, one
    PersistentVolumeClaim of `size` per pod, created and deleted with it. Unset: an emptyDir."""


class ResourcesSpec(ApiModel):
    """Compute resources for each training pod (GPU requests come from `distributed.gpusPerNode`)."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Resource requests, e.g. {cpu: "8", memory: 64Gi}."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Resource limits."""


# ------------------------------------------------------------------- serving


class ServingSpec(ApiModel):
    """What serves the model once the job has succeeded: a KServe InferenceService or a plain Deployment.

    The operator creates it only when the job Succeeds (a failed job, or one that fails its evaluation gate,
    creates nothing), owned by the FineTuneJob and named in `status.serving`."""

    kind: Literal["InferenceService", "Deployment"] = "InferenceService"
    """`InferenceService` (KServe, serving.kserve.io/v1beta1: the Hugging Face runtime, vLLM where it can) or `Deployment` (apps/v1, running `image` with the model's location in its environment)."""
    name: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
    )
    """Name of the served object; unset: the FineTuneJob's name."""
    model: Literal["auto", "merged", "adapter"] = "auto"
    """What is served: `merged` (the merged or fully fine-tuned weights, or the published OCI artifact), `adapter` (the base model plus the LoRA adapter: vLLM's --enable-lora), or `auto` (merged when the job writes merged weights, else the adapter)."""
    image: str | None = Field(default=None, min_length=1, max_length=1024)
    """Serving image: required with kind `Deployment` (e.g. vllm/vllm-openai); with `InferenceService` it overrides the runtime's image."""
    runtime: str | None = Field(default=None, min_length=1, max_length=253)
    """InferenceService: the ServingRuntime to use (e.g. `kserve-huggingfaceserver`); unset: KServe picks one for modelFormat huggingface."""
    args: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=64)
    """Extra arguments for the model server (after the ones kubetune sets)."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Extra environment variables for the model server."""
    port: int = Field(default=8080, ge=1, le=65535)
    """Deployment: the port the server listens on (KUBETUNE_SERVING_PORT; a Service is not created)."""
    replicas: int = Field(default=1, ge=0, le=1000)
    """Deployment replicas; InferenceService minReplicas."""
    gpus: int = Field(default=0, ge=0, le=64)
    """GPUs per replica (`nvidia.com/gpu`)."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """CPU and memory requests and limits per replica (GPUs: `gpus`)."""
    service_account_name: str | None = Field(default=None, min_length=1, max_length=253)
    """ServiceAccount of the serving pods; for an InferenceService reading s3://, the one KServe takes S3 credentials from."""
    run_as_user: int = Field(default=1000, ge=1, le=2147483647)
    """Deployment: the user (and group) the server runs as. Never root: the pods meet Pod Security "restricted"."""


# ---------------------------------------------------------------- evaluation


_RETAIN_ONE_INPUT = "spec.evaluation.retain: set exactly one of train (one dataset) or sources (several)"
_RETAIN_NO_EVAL = (
    "spec.evaluation.retain: eval and evalSplit do not apply (the whole retain set is scored); remove them"
)


class RetainSpec(DatasetSpec):
    """Data from the base model's domain, read like `dataset` (its `train` or `sources`, format, fields, maxSeqLength)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("has(self.train) != (has(self.sources) && size(self.sources) > 0)", _RETAIN_ONE_INPUT),
            ("!has(self.eval) && (!has(self.evalSplit) || self.evalSplit == 0.0)", _RETAIN_NO_EVAL),
        )
    )

    @model_validator(mode="after")
    def _one_training_input(self) -> RetainSpec:
        if bool(self.train) == bool(self.sources):
            raise ValueError(_RETAIN_ONE_INPUT)
        if self.eval or self.eval_split:
            raise ValueError(_RETAIN_NO_EVAL)
        return self


class GenerationCheck(ApiModel):
    """A prompt answered greedily after training, and what the answer must contain."""

    prompt: str = Field(min_length=1, max_length=4096)
    """The user's message (sent through the tokenizer's chat template when it has one, unless `raw`)."""
    expect: str = Field(min_length=1, max_length=1024)
    """What the answer must contain: a substring, or a Python regular expression searched in it (`match: regex`)."""
    match: Literal["substring", "regex"] = "substring"
    """How `expect` is compared with the answer."""
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    """Longest answer generated."""
    raw: bool = False
    """Send the prompt as plain text, without the chat template."""

    @model_validator(mode="after")
    def _regex_compiles(self) -> GenerationCheck:
        if self.match == "regex":
            try:
                re.compile(self.expect)
            except re.error as exc:
                raise ValueError(
                    f"expect is not a valid regular expression ({exc}); fix it or set match: substring"
                ) from None
        return self


class EvaluationGate(ApiModel):
    """Thresholds the final model must meet; a job that misses one ends Failed (EvaluationGateFailed) and publishes nothing."""

    max_eval_loss: float | None = Field(default=None, gt=0.0)
    """Highest acceptable held-out loss (needs evaluation data)."""
    max_perplexity: float | None = Field(default=None, ge=1.0)
    """Highest acceptable held-out perplexity, exp(eval loss) (needs evaluation data and objective sft)."""
    min_exact_match: float | None = Field(default=None, ge=0.0, le=1.0)
    """Lowest acceptable share of greedy answers equal to the reference (needs training.evalGenerationSamples)."""
    min_generation_pass: float | None = Field(default=None, ge=0.0, le=1.0)
    """Lowest acceptable share of `evaluation.generations` checks passed."""
    max_forgetting_percent: float | None = Field(default=None, ge=0.0)
    """Highest acceptable increase of the retain loss over the base model's, in percent (needs `evaluation.retain`)."""


class EvaluationSpec(ApiModel):
    """What is measured after training, and the gate the final model must pass."""

    retain: RetainSpec | None = None
    """Data from the base model's domain (its `train` or `sources`; format, fields and maxSeqLength as for `dataset`), scored by the base model before training and by the final one after: forgetting is the increase of its loss, in percent."""
    generations: list[GenerationCheck] = Field(default_factory=list, max_length=64)
    """Prompts answered greedily after training, each with the substring or regex its answer must contain."""
    gate: EvaluationGate | None = None
    """Thresholds; unset: figures are reported, nothing is refused."""


# ---------------------------------------------------------------------- spec

TRAINED_FIELDS: Final[tuple[str, ...]] = (
    "model",
    "dataset",
    "method",
    "lora",
    "promptTuning",
    "prefixTuning",
    "ia3",
    "objective",
    "dpo",
    "freeze",
    "training",
    "distributed",
    "output",
)
"""The spec fields that say what a run trains, as written in YAML. The API server keeps them frozen while
a gang is active (changing them would mix two trainings in one set of checkpoints: the CEL transition rule
kubetune.api.crd.immutability_rule); once the job finished, an edit to one of them starts a new run
(kubetune.status.runs fingerprints them, all but spec.output.resumeFrom and spec.output.publish, which say
only how a run starts and where its result also goes)."""


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on what, how, and where the result goes."""

    # Cross-field rules: one table (kubetune.api.rules) gives the API server its CEL and validation.py its twins.
    model_config = ConfigDict(json_schema_extra=cel_validations(SPEC_RULES + EVALUATION_RULES))

    model: ModelSpec
    """The pretrained model to start from."""
    dataset: DatasetSpec
    """Training and evaluation data."""
    method: Literal["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "full"] = "lora"
    """`lora` trains a low-rank adapter; `dora` a weight-decomposed LoRA; `ia3` rescaling vectors; `prompt_tuning` virtual input tokens; `prefix_tuning` per-layer key/value prefixes; `full` all (unfrozen) parameters."""
    lora: LoraSpec | None = None
    """LoRA settings (methods `lora` and `dora`; defaults apply when omitted)."""
    prompt_tuning: PromptTuningSpec | None = None
    """Prompt tuning settings (only with method `prompt_tuning`)."""
    prefix_tuning: PrefixTuningSpec | None = None
    """Prefix tuning settings (only with method `prefix_tuning`)."""
    ia3: Ia3Spec | None = None
    """IA3 settings (only with method `ia3`)."""
    objective: Literal["sft", "dpo"] = "sft"
    """`sft`: learn the responses (cross-entropy); `dpo`: learn preferences from prompt/chosen/rejected pairs."""
    dpo: DpoSpec | None = None
    """DPO settings (only with objective `dpo`; defaults apply when omitted)."""
    freeze: FreezeSpec | None = None
    """Partial fine-tuning: freeze the first layers or train only named modules."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Optimisation settings."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """Processes, nodes and the parallelism backend."""
    output: OutputSpec
    """Where checkpoints and artifacts are written."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """S3 endpoint, region and credentials (Secret reference)."""
    evaluation: EvaluationSpec | None = None
    """Evaluation after training (held-out loss and perplexity, exact match, generation checks, forgetting on a retain set) and its gate."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Restarts, deadline, TTL and suspend."""
    image: str | None = Field(default=None, max_length=1024)
    """Trainer image; unset uses the operator's default."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """Image pull policy for the trainer container."""
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    """Secrets for pulling the image."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """CPU/memory requests and limits per pod."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods must match."""
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, json_schema_extra={"items": dict(PRESERVE)}
    )
    """Pod tolerations (as in a Pod)."""
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """Pod affinity (as in a Pod)."""
    priority_class_name: str | None = None
    """PriorityClass for the pods."""
    scheduler_name: str | None = None
    """Scheduler for the pods (e.g. a gang scheduler such as Volcano)."""
    scheduling: SchedulingSpec | None = None
    """Gang scheduling (spec.scheduling.gang): the PodGroup a gang scheduler needs, rendered and owned by the job."""
    service_account_name: str | None = None
    """ServiceAccount the pods run as."""
    env: list[EnvVar] = Field(default_factory=list)
    """Extra environment variables for the trainer."""
    volumes: list[CacheVolume] = Field(default_factory=list)
    """Extra volumes (caches, data PVCs) mounted in every pod."""
    scratch: ScratchSpec = Field(default_factory=ScratchSpec)
    """The trainer's scratch and checkpoint-staging space: its size, and a StorageClass to put it on."""
    shm_size: Quantity = "16Gi"
    """Size of /dev/shm (a memory-backed emptyDir, counted in the pod's memory): NCCL and DataLoader workers
    need more than the runtime's 64Mi. 64Mi to 1Ti."""
    termination_grace_period_seconds: int = Field(default=300, ge=30, le=86400)
    """Seconds a stopping pod (suspend, preemption, drain, gang restart) has to write its checkpoint to storage
    before it is killed. Large models on slow storage need more. A pod with nothing to save is stopped after 1 s
    instead: a peer of a rank lost with its node (it cannot checkpoint without it), a pod of a gang that never
    formed."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels for the pods (e.g. for Kueue or cost allocation)."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Extra annotations for the pods."""
    serving: ServingSpec | None = None
    """Serve the model when the job succeeds: a KServe InferenceService or a Deployment, owned by the job (status.serving)."""
    tracking: TrackingSpec | None = None
    """Experiment tracking: MLflow (and its model registry) and Weights & Biases."""


# -------------------------------------------------------------------- status

Phase = Literal["Pending", "Initializing", "Running", "Succeeded", "Failed", "Suspended", "Restarting"]


class Condition(ApiModel):
    """Shaped like metav1.Condition."""

    type: str
    """Condition type, e.g. Ready, Succeeded, Failed, Suspended, SpecValid."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str
    """CamelCase reason."""
    message: str = ""
    """What a person should know, and the fix where there is one."""
    last_transition_time: str
    """When the status last flipped (RFC 3339)."""
    observed_generation: int | None = None
    """The spec generation this condition describes."""


class TrainingMetrics(ApiModel):
    """The measured part of progress: what rank 0 reports (kubetune.api.contract.ProgressReport) and
    status.progress shows. Each field is also a gauge, kubetune_trainer_<snake_name>, on rank 0's /metrics."""

    step: int | None = None
    """Optimizer steps completed."""
    total_steps: int | None = None
    """Optimizer steps planned."""
    epoch: float | None = None
    """Fractional epoch reached."""
    loss: float | None = None
    """Latest training loss."""
    eval_loss: float | None = None
    """Latest evaluation loss."""
    reward_accuracy: float | None = None
    """DPO: share of pairs whose chosen reply the policy prefers over the rejected one, relative to the reference (latest logging window)."""
    reward_margin: float | None = None
    """DPO: mean (chosen reward - rejected reward), in units of beta x log-probability ratio."""
    learning_rate: float | None = None
    """Current learning rate."""
    tokens_per_second: float | None = None
    """Training throughput across all ranks."""
    eta_seconds: float | None = None
    """Estimated seconds until training ends."""


class TrackingStatus(ApiModel):
    """Where the run is in the experiment trackers (spec.tracking)."""

    mlflow_run: str | None = None
    """The MLflow run's URL."""
    mlflow_run_id: str | None = None
    """The MLflow run's id (a restarted gang continues this run)."""
    mlflow_model_version: str | None = None
    """The registered model version, `name/version` (spec.tracking.mlflow.registerAs), once the job succeeded and passed its gate."""
    wandb_run: str | None = None
    """The W&B run's URL (online), or where its offline run directory was written (`<uri>/wandb/`)."""


class NetworkPair(ApiModel):
    """One pair of neighbouring ranks in the ring: what the receiver measured."""

    source: int = Field(ge=0)
    """The sending rank."""
    target: int = Field(ge=0)
    """The receiving rank."""
    source_pod: str | None = None
    """The sender's pod."""
    target_pod: str | None = None
    """The receiver's pod."""
    latency_ms: float
    """Median time of a 4-byte message, milliseconds."""
    bandwidth_gbps: float
    """spec.distributed.networkCheck.megabytes per median transfer time, GB/s (10^9 bytes)."""


class NetworkReport(ApiModel):
    """The network check before training (spec.distributed.networkCheck): the ring of point-to-point messages and one all-reduce, timed over the training backend."""

    backend: str
    """The process group's backend: nccl or gloo."""
    world_size: int = Field(ge=1)
    """Ranks that took part."""
    megabytes: int = Field(ge=1)
    """Size of the all-reduce and of each bandwidth message."""
    all_reduce_ms: float | None = None
    """Median time of the all-reduce, milliseconds (none with one rank)."""
    all_reduce_bus_gbps: float | None = None
    """The all-reduce's bus bandwidth, GB/s: 2 x (worldSize - 1) / worldSize x bytes / time (NCCL-tests' convention)."""
    min_bandwidth_gbps: float | None = None
    """The slowest pair's bandwidth."""
    max_latency_ms: float | None = None
    """The slowest pair's latency."""
    seconds: float
    """Wall time of the whole check on rank 0."""
    checked_at: str | None = None
    """When it ran (RFC 3339): after each gang restart it runs again."""
    pairs: list[NetworkPair] = Field(default_factory=list)
    """Per pair of neighbouring ranks (rank r sends to r+1): the slowest 16 in status.network, all in metrics.json."""


class TrainerReport(TrainingMetrics):
    """Everything rank 0 reports besides its phase: the metrics, and what it found worth a look."""

    data_warning: str | None = Field(default=None, max_length=512)
    """What rank 0 found in the data worth a look: more than 1% of examples truncated or dropped at maxSeqLength, or invalid records skipped."""
    checkpoint_warning: str | None = Field(default=None, max_length=512)
    """A checkpoint that failed verification against its manifest on resume: which, why, and where it was set aside (the next older one was used)."""
    tracking: TrackingStatus | None = None
    """Where rank 0 reports the run (spec.tracking)."""
    network: NetworkReport | None = None
    """The network check before training (spec.distributed.networkCheck); the operator copies it to status.network."""


class Progress(TrainerReport):
    """Training progress reported by rank 0."""

    percent: float | None = None
    """step / totalSteps x 100."""
    eta: str | None = None
    """The same estimate for people (e.g. `1h05m`)."""
    trainer_phase: str | None = None
    """What rank 0 says it is doing: Initializing, Training, Evaluating, Saving, Succeeded or Failed."""
    updated_at: str | None = None
    """When the operator last read progress from rank 0 (RFC 3339)."""


class CheckpointRecord(ApiModel):
    """A complete checkpoint (its manifest and COMPLETE marker written): which step, where, when."""

    step: int = Field(ge=0)
    """The optimizer step it holds."""
    uri: str
    """Its directory under the run's output (`<uri>/checkpoints/step-<n>/`)."""
    time: str
    """When it was sealed (RFC 3339, the trainer's clock)."""


class Artifacts(ApiModel):
    """Where the results are."""

    checkpoint: str | None = None
    """Newest complete checkpoint."""
    adapter: str | None = None
    """PEFT adapter (LoRA)."""
    merged_model: str | None = None
    """Full model weights (merged adapter or full fine-tune), safetensors."""
    metrics: str | None = None
    """metrics.json."""
    manifest: str | None = None
    """manifest.json (every file with its sha256)."""
    oci: str | None = None
    """The published OCI artifact, digest-pinned: `registry/repository@sha256:...` (spec.output.publish)."""
    interpolation: str | None = None
    """The WiSE-FT mixes, one directory per alpha (spec.output.interpolate with keepMixes)."""
    huggingface: str | None = None
    """The Hugging Face Hub repository the model was pushed to, at its commit (spec.output.publish.huggingface)."""


class EvaluationResult(ApiModel):
    """The final model's figures and the gate's verdict: the trainer's termination message carries it, status.evaluation shows it."""

    eval_loss: float | None = None
    """Held-out loss of the final model."""
    perplexity: float | None = None
    """exp(evalLoss) (objective sft)."""
    retain_loss_before: float | None = None
    """Retain-set loss of the base model."""
    retain_loss_after: float | None = None
    """Retain-set loss of the final model."""
    forgetting_percent: float | None = None
    """(retainLossAfter / retainLossBefore - 1) x 100."""
    exact_match: float | None = None
    """Share of greedy answers equal to the reference."""
    generation_pass: float | None = None
    """Share of generation checks passed."""
    alpha: float | None = None
    """The weight mix in model/ (1: the fine-tuned model; below 1 when output.select picked an interpolation)."""
    gate_passed: bool | None = None
    """Whether every gate threshold was met (unset without a gate)."""
    failed_checks: list[str] = Field(default_factory=list)
    """Each missed threshold, e.g. `evalLoss 3.41 > maxEvalLoss 0.5`."""

    def summary(self) -> str:
        """The figures on one line, e.g. `evalLoss 0.0049, perplexity 1.005, forgetting 2.1%; gate passed`."""
        shown = [("evalLoss", self.eval_loss, "{:.4g}"), ("perplexity", self.perplexity, "{:.4g}"),
                 ("retainLoss", self.retain_loss_after, "{:.4g}"), ("forgetting", self.forgetting_percent, "{:.1f}%"),
                 ("exactMatch", self.exact_match, "{:.3f}"), ("generationPass", self.generation_pass, "{:.3f}"),
                 ("alpha", None if self.alpha in (None, 1.0) else self.alpha, "{:g}")]  # fmt: skip
        text = (
            ", ".join(f"{name} {fmt.format(value)}" for name, value, fmt in shown if value is not None)
            or "no figures"
        )
        if self.gate_passed is None:
            return text
        return f"{text}; gate {'passed' if self.gate_passed else 'failed: ' + '; '.join(self.failed_checks)}"


class UsageFigures(ApiModel):
    """Resources a job used: seconds of gang time, restarts included, suspended time excluded."""

    wall_seconds: float = Field(default=0.0, ge=0)
    """Seconds the job was active (Pending, Initializing, Running or Restarting; not Suspended)."""
    node_seconds: float = Field(default=0.0, ge=0)
    """Trainer pod-seconds (one pod per node): the sum over pods of the seconds each was Running."""
    gpu_seconds: float = Field(default=0.0, ge=0)
    """nodeSeconds x spec.distributed.gpusPerNode."""
    estimated_cost: float | None = None
    """From the operator's price table (chart value `prices`), when it has one: GPU-hours x the price of the GPU resource plus node-hours x the price of the node type."""


class RunUsage(UsageFigures):
    """One run's usage (status.run)."""

    run: int = Field(ge=1)
    """The run number."""


class Usage(UsageFigures):
    """What the job used in all its runs (the totals), and per run."""

    currency: str | None = None
    """The price table's currency (with estimatedCost)."""
    runs: list[RunUsage] = Field(default_factory=list)
    """Per run, oldest first (the current run last)."""
    running_pods: int = Field(default=0, ge=0)
    """Trainer pods Running when the operator last looked (what it counts until it looks again)."""
    updated_at: str | None = None
    """When the figures were last brought up to date (RFC 3339)."""


class ServingStatus(ApiModel):
    """The object created to serve the model (spec.serving)."""

    kind: str
    """InferenceService or Deployment."""
    name: str
    """Its name, in the FineTuneJob's namespace."""
    uri: str | None = None
    """What it serves: the merged model or the OCI reference (with `model: adapter`, the adapter)."""


class FailureInfo(ApiModel):
    """A failed rank, as the operator saw it."""

    pod: str | None = None
    """The pod that failed."""
    exit_code: int | None = None
    """Its trainer container's exit code."""
    reason: str | None = None
    """CamelCase reason (from the exit code or the termination message)."""
    message: str | None = None
    """The trainer's termination message."""


class RunRecord(ApiModel):
    """A finished run: one trained spec generation, start to end."""

    run: int = Field(ge=1)
    """Run number (1 is the first)."""
    generation: int | None = None
    """The spec generation (metadata.generation) this run trained."""
    start_time: str | None = None
    """When its first gang started (RFC 3339)."""
    completion_time: str | None = None
    """When it succeeded or failed (RFC 3339)."""
    outcome: Literal["Succeeded", "Failed"]
    """How it ended."""
    message: str | None = None
    """The final status message."""
    uri: str
    """Where it wrote its checkpoints and artifacts."""
    resumed_from: str | None = None
    """The previous run's output it resumed from (spec.output.resumeFrom: previous)."""
    artifacts: Artifacts | None = None
    """Its results (when it succeeded)."""


class FineTuneJobStatus(ApiModel):
    """Observed state, written by the operator."""

    model_config = ConfigDict(extra="allow")

    phase: Phase | None = None
    """Pending, Initializing, Running, Succeeded, Failed, Suspended or Restarting."""
    message: str | None = None
    """Short human summary of the current phase."""
    conditions: list[Condition] = Field(default_factory=list)
    """Conditions (metav1.Condition): SpecValid, Running, Succeeded, Failed, Suspended, Evaluated."""
    observed_generation: int | None = None
    """The spec generation the operator last acted on."""
    start_time: str | None = None
    """When the first pod of the first gang started (RFC 3339)."""
    completion_time: str | None = None
    """When the job succeeded or failed (RFC 3339)."""
    restarts: int = 0
    """Whole-gang restarts so far."""
    gang_nodes: int | None = None
    """Elastic jobs (spec.distributed.minNodes): the nodes the current gang trains on, spec.distributed.nodes or fewer after a shrink."""
    world_size: int | None = None
    """Elastic jobs: the current gang's processes (gangNodes x procsPerNode), which its trainer config carries."""
    progress: Progress | None = None
    """Training progress from rank 0."""
    artifacts: Artifacts | None = None
    """Where the results are (set on success)."""
    evaluation: EvaluationResult | None = None
    """The final model's evaluation figures and gate verdict (spec.evaluation), from the trainer."""
    last_failure: FailureInfo | None = None
    """The last failed rank: exit code, reason and message (from its termination message)."""
    last_checkpoint: CheckpointRecord | None = None
    """The newest checkpoint the current run wrote (from rank 0's progress, or a rank's termination message): the step a restart resumes from."""
    workload: str | None = None
    """Name of the current batch/v1 Job."""
    run: int = 1
    """The current run: an edit of what is trained after the job finished starts run n+1."""
    run_uri: str | None = None
    """Where the current run writes (spec.output.uri for run 1, `<uri>/run-<n>/` after)."""
    resumed_from: str | None = None
    """The previous run's output the current run resumed from (spec.output.resumeFrom: previous)."""
    trained_spec_hash: str | None = None
    """Fingerprint of the current run's trained fields (kubetune.api.TRAINED_FIELDS): a finished job whose spec no longer matches it starts a new run."""
    run_generation: int | None = None
    """The spec generation the current run trains."""
    runs: list[RunRecord] = Field(default_factory=list)
    """Earlier runs, oldest first."""
    serving: ServingStatus | None = None
    """The InferenceService or Deployment serving the model (spec.serving), once created."""
    tracking: TrackingStatus | None = None
    """Where the run is in MLflow and W&B (spec.tracking): the run URL, and the registered model version."""
    usage: Usage | None = None
    """GPU-seconds, node-seconds and wall time, per run and in total (restarts included, suspended time excluded), and the estimated cost."""
    network: NetworkReport | None = None
    """The current gang's network check before training (spec.distributed.networkCheck): bandwidth and latency per pair of ranks and of one all-reduce."""

    @classmethod
    def from_stored(cls, raw: dict[str, Any] | None) -> FineTuneJobStatus:
        """The status as the API server holds it, typed; its keys become the fields set. Kopf's own
        bookkeeping (`status.kopf`, left by older operators) is not part of it."""
        return cls.model_validate({k: v for k, v in (raw or {}).items() if k != "kopf"})

    def to_patch(self) -> dict[str, Any]:
        """The one serialisation of a status the operator writes (a JSON merge patch): each field that was
        set, camelCase; a field set to None removes the key; None inside objects is left out."""
        full = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        fields_set = self.model_dump(by_alias=True, include=self.model_fields_set, mode="json")
        return {key: full.get(key) for key in fields_set}


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None


class FineTuneJob(BaseModel):
    """A whole FineTuneJob object as read from YAML or the API."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    api_version: Literal["kubetune.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["FineTuneJob"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None
