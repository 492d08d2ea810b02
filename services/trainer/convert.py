"""All protobuf <-> domain conversion of the trainer service."""

from __future__ import annotations

import dataclasses
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2

from services.common.errors import field_error
from services.common.timestamps import to_timestamp_or_none
from services.trainer.domain import Event, EventKind, Job, Method
from services.trainer.methods import BY_PARAMS_FIELD, METHODS
from services.trainer.params import ALL_LINEAR, DevicePlan, LoraParams, Sampling, TrainingParams
from services.trainer.resources import Estimate
from services.trainer.spec import JobSpec
from tlm.rollout.v1 import rollout_pb2
from tlm.trainer.v1 import trainer_pb2 as pb

DEVICE_TYPES = {
    pb.DEVICE_TYPE_UNSPECIFIED: "auto",
    pb.DEVICE_TYPE_CPU: "cpu",
    pb.DEVICE_TYPE_CUDA: "cuda",
}
DEVICE_TYPE_PB = {v: k for k, v in DEVICE_TYPES.items()}
STRATEGIES = {
    pb.PARALLEL_STRATEGY_UNSPECIFIED: "auto",
    pb.PARALLEL_STRATEGY_SINGLE_DEVICE: "single",
    pb.PARALLEL_STRATEGY_DDP: "ddp",
    pb.PARALLEL_STRATEGY_FSDP: "fsdp",
}
STRATEGY_PB = {v: k for k, v in STRATEGIES.items()}


def _set(message: Message, *names: str) -> dict[str, Any]:
    """The fields of `message` among `names` that were set (optional) or are non-zero."""
    out = {}
    for name in names:
        field = message.DESCRIPTOR.fields_by_name[name]
        value = getattr(message, name)
        if field.has_presence and not message.HasField(name):
            continue
        if not field.has_presence and not value:
            continue
        # float32 fields: 0.05 arrives as 0.0500000007; keep the digits the sender meant.
        out[name] = float(f"{value:.7g}") if field.type == FieldDescriptor.TYPE_FLOAT else value
    return out


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def revision_ref(name: str, collection: str) -> str:
    """'models/m' -> 'models/m/revisions/latest'; anything else unchanged (validated later)."""
    if name.startswith(f"{collection}/") and name.count("/") == 1:
        return f"{name}/revisions/latest"
    return name


def sampling_from_proto(s: rollout_pb2.SamplingParams) -> Sampling:
    values = _set(s, "n", "temperature", "top_p", "top_k", "max_tokens", "seed", "skip_logprobs")
    return Sampling(**values, stop=tuple(s.stop))


def _params_from_proto(spec: pb.TrainingJobSpec) -> Any:
    """The method params message that is set, as its method's params class (methods.py)."""
    which = spec.WhichOneof("method_params")
    if which is None:
        return None
    message, cls = getattr(spec, which), BY_PARAMS_FIELD[which].params
    known = {f.name for f in message.DESCRIPTOR.fields}
    names = [f.name for f in dataclasses.fields(cls) if f.name in known and f.name != "sampling"]
    values = _set(message, *names)
    if "sampling" in {f.name for f in dataclasses.fields(cls)}:
        values["sampling"] = sampling_from_proto(message.sampling)
        if message.sampling.logprobs_mode:  # not in Sampling: refused here, not ignored
            raise field_error(
                f"spec.{which}.sampling.logprobs_mode",
                "is chosen by the trainer (GRPO: temperature-scaled with "
                "importance_sampling_correction, else raw); leave it unset",
            )
    if values.get("critic_model"):  # PPO's: a model revision, "models/m" its latest
        values["critic_model"] = revision_ref(values["critic_model"], "models")
    return cls(**values)


def _lora_from_proto(tuning: pb.Tuning) -> LoraParams | None:
    if tuning.WhichOneof("mode") == "full":
        return None
    lora = tuning.lora
    modules = tuple(lora.target_modules) or (ALL_LINEAR,)
    values = _set(lora, "r", "dropout", "alpha_value", "alpha")
    if "alpha_value" in values and "alpha" in values:
        raise field_error(
            "spec.tuning.lora.alpha_value",
            "set alpha_value or the deprecated alpha (spec.tuning.lora.alpha), not both",
        )
    alpha = values.pop("alpha_value", values.pop("alpha", None))
    if alpha is not None:  # both wire fields mean one float
        values["alpha"] = float(alpha)
    return LoraParams(**values, target_modules=modules)


def _plan_from_proto(resources: pb.Resources) -> tuple[DevicePlan, bool]:
    if resources.WhichOneof("plan") != "explicit":
        return DevicePlan(max_devices=resources.auto.max_devices), False
    e = resources.explicit
    at = "spec.resources.explicit"
    plan = DevicePlan(
        device_type=_lookup(DEVICE_TYPES, e.device_type, f"{at}.device_type"),
        strategy=_lookup(STRATEGIES, e.strategy, f"{at}.strategy"),
        precision=e.precision,
        gradient_checkpointing=e.gradient_checkpointing,
        cpu_offload=e.cpu_offload,
        **_set(e, "devices_per_node", "num_nodes"),
    )
    return plan, True


def spec_from_proto(spec: pb.TrainingJobSpec) -> JobSpec:
    plan, explicit = _plan_from_proto(spec.resources)
    training = TrainingParams(**_set(spec.training, *_fields(TrainingParams)))
    return JobSpec(
        method=_method(spec.method),
        base_model=revision_ref(spec.base_model, "models"),
        train_dataset=revision_ref(spec.train_dataset, "datasets"),
        lora=_lora_from_proto(spec.tuning),
        eval_dataset=revision_ref(spec.eval_dataset, "datasets"),
        evaluator=revision_ref(spec.evaluator, "evaluators"),
        output_model=spec.output_model,
        training=training,
        params=_params_from_proto(spec),
        resources=plan,
        explicit_resources=explicit,
    )


def _method(value: int) -> Method:
    if value in Method.__members__.values():
        return Method(value)
    known = ", ".join(m.name for m in Method)
    described = "is required" if not value else f"{value} is not a method"
    raise field_error("spec.method", f"{described} ({known})")


def _lookup(table: dict[Any, str], value: int, path: str) -> str:
    """An enum number the proto may not know yet (proto3 enums are open)."""
    if value not in table:
        raise field_error(path, f"{value} is not a known value")
    return table[value]


# Domain -> proto ---------------------------------------------------------------------------


def sampling_to_proto(s: dict[str, Any]) -> rollout_pb2.SamplingParams:
    values = {k: v for k, v in s.items() if v is not None}
    values["stop"] = list(values.get("stop", ()))
    return rollout_pb2.SamplingParams(**values)


def plan_to_proto(plan: dict[str, Any]) -> pb.DevicePlan:
    return pb.DevicePlan(
        device_type=DEVICE_TYPE_PB[plan.get("device_type", "auto")],  # type: ignore[arg-type]
        devices_per_node=plan.get("devices_per_node", 1),
        num_nodes=plan.get("num_nodes", 1),
        strategy=STRATEGY_PB[plan.get("strategy", "auto")],  # type: ignore[arg-type]
        precision=plan.get("precision", ""),
        gradient_checkpointing=plan.get("gradient_checkpointing", False),
        cpu_offload=plan.get("cpu_offload", False),
    )


def spec_to_proto(data: dict[str, Any]) -> pb.TrainingJobSpec:
    """The stored spec (JobSpec.to_dict(), defaults filled in) as a message."""
    method = Method(data["method"])
    training = {k: v for k, v in data["training"].items() if v is not None}
    spec = pb.TrainingJobSpec(
        method=int(method),  # type: ignore[arg-type]
        base_model=data["base_model"],
        train_dataset=data["train_dataset"],
        eval_dataset=data.get("eval_dataset", ""),
        evaluator=data.get("evaluator", ""),
        output_model=data.get("output_model", ""),
        training=pb.TrainingParams(**training),
    )
    lora = data.get("lora")
    if lora is None:
        spec.tuning.full.SetInParent()
    else:
        spec.tuning.lora.CopyFrom(
            pb.LoraConfig(
                r=lora["r"],
                alpha_value=float(lora["alpha"]),
                dropout=lora["dropout"],
                target_modules=list(lora["target_modules"]),
            )
        )
    field_name = METHODS[method].params_field
    params = dict(data.get("params") or {})
    target = getattr(spec, field_name)
    if "sampling" in params:
        target.sampling.CopyFrom(sampling_to_proto(params.pop("sampling")))
    target.MergeFrom(type(target)(**params))
    target.SetInParent()
    resources = data["resources"]
    if data.get("explicit_resources"):
        spec.resources.explicit.CopyFrom(plan_to_proto(resources))
    else:
        spec.resources.auto.max_devices = resources.get("max_devices", 0)
    return spec


def job_to_proto(job: Job) -> pb.TrainingJob:
    message = pb.TrainingJob(
        name=job.name,
        display_name=job.display_name,
        spec=spec_to_proto(job.spec),
        state=int(job.state),  # type: ignore[arg-type]
        device_plan=plan_to_proto(job.device_plan),
        progress=pb.Progress(
            step=job.progress.step,
            total_steps=job.progress.total_steps,
            epoch=job.progress.epoch,
            metrics=job.progress.metrics,
        ),
        output_model_revision=job.output_model_revision,
        final_metrics=job.final_metrics,
        request_id=job.request_id,
        labels=job.labels,
        create_time=to_timestamp_or_none(job.create_time),
        start_time=to_timestamp_or_none(job.start_time),
        end_time=to_timestamp_or_none(job.end_time),
        checkpoint_step=job.checkpoint_step,
    )
    if job.error is not None:
        code = getattr(code_pb2, job.error.code, code_pb2.INTERNAL)
        message.error.CopyFrom(status_pb2.Status(code=code, message=job.error.message))
    return message


def event_to_proto(event: Event) -> pb.JobEvent:
    message = pb.JobEvent(sequence=event.sequence, time=to_timestamp_or_none(event.time))
    d = event.data
    if event.kind is EventKind.STATE:
        message.state_change.CopyFrom(pb.StateChange(state=d["state"], message=d["message"]))
    elif event.kind is EventKind.METRICS:
        message.metrics.CopyFrom(
            pb.StepMetrics(step=d["step"], epoch=d["epoch"], values=d["values"])
        )
    elif event.kind is EventKind.CHECKPOINT:
        checkpoint = pb.Checkpoint(step=d["step"], policy_revision=d.get("policy_revision", ""))
        message.checkpoint.CopyFrom(checkpoint)
    elif event.kind is EventKind.RESULT:
        result = pb.JobResult(
            output_model_revision=d["output_model_revision"], metrics=d["metrics"]
        )
        message.result.CopyFrom(result)
    else:
        message.log.CopyFrom(pb.LogLine(level=d["level"], message=d["message"]))
    return message


def estimate_to_proto(e: Estimate) -> pb.EstimateResourcesResponse:
    return pb.EstimateResourcesResponse(
        plan=plan_to_proto(e.plan.__dict__),
        parameter_count=e.parameter_count,
        trainable_parameter_count=e.trainable_parameter_count,
        memory_per_device_bytes=e.memory_per_device_bytes,
        memory_breakdown_bytes=e.breakdown,
        fits=e.fits,
        notes=e.notes,
    )


def job_id_from_name(name: str) -> str:
    """'jobs/{id}' -> id; anything else is INVALID_ARGUMENT on `name`."""
    prefix, _, job_id = name.partition("/")
    if prefix != "jobs" or not job_id or "/" in job_id or len(job_id) > 64:
        raise field_error("name", "must look like jobs/{job}")
    return job_id
