"""All protobuf <-> domain conversion of the deploy service."""

from __future__ import annotations

from services.common.timestamps import to_timestamp_or_none
from services.deploy.domain import Deployment, Resolved, SamplingDefaults, Spec
from tlm.deploy.v1 import deploy_pb2 as pb


def sampling_from_proto(s: pb.SamplingDefaults) -> SamplingDefaults:
    return SamplingDefaults(
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        top_k=s.top_k,
        stop=tuple(s.stop),
    )


def sampling_to_proto(s: SamplingDefaults) -> pb.SamplingDefaults:
    return pb.SamplingDefaults(
        temperature=s.temperature,
        top_p=s.top_p,
        max_tokens=s.max_tokens,
        top_k=s.top_k,
        stop=list(s.stop),
    )


def spec_from_proto(d: pb.Deployment) -> Spec:
    """The user's part of a Deployment message; replicas 0 means the default (1)."""
    return Spec(
        model=d.model,
        adapter=d.adapter,
        replicas=d.replicas or 1,
        sampling=sampling_from_proto(d.sampling_defaults),
        description=d.description,
    )


def _model(r: Resolved | None) -> str:
    return r.model if r else ""


def _adapter(r: Resolved | None) -> str:
    return r.adapter if r else ""


def deployment_to_proto(d: Deployment, pool: str) -> pb.Deployment:
    return pb.Deployment(
        name=d.name,
        model=d.spec.model,
        adapter=d.spec.adapter,
        replicas=d.spec.replicas,
        sampling_defaults=sampling_to_proto(d.spec.sampling),
        description=d.spec.description,
        model_revision=_model(d.current),
        adapter_revision=_adapter(d.current),
        pending_model_revision=_model(d.pending),
        pending_adapter_revision=_adapter(d.pending),
        previous_model_revision=_model(d.previous),
        previous_adapter_revision=_adapter(d.previous),
        state=int(d.state),  # type: ignore[arg-type]
        state_reason=d.state_reason,
        pool=pool,
        etag=d.etag,
        create_time=to_timestamp_or_none(d.create_time),
        update_time=to_timestamp_or_none(d.update_time),
    )
