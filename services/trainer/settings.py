"""Runtime settings of the trainer service, from `TLM_TRAINER_...` environment variables.

Jobs keep their folders (worker logs, checkpoints, the model cache) and the SQLite job store
under `<data_dir>/trainer`. Jobs may run on Kubernetes instead, as an indexed Job per job
(`kubernetes_jobs.py`): the `kubernetes_*` settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


class TrainerSettings(ServerSettings):
    """`TLM_TRAINER_...`: where jobs keep their work and the addresses of other services."""

    model_config = SettingsConfigDict(env_prefix="TLM_TRAINER_", extra="ignore")

    # Other services; unset means this server's own address (`tlm up`).
    registry_address: str | None = None
    reward_address: str | None = None
    rollout_address: str | None = None
    # Workers running at once; more jobs wait PENDING.
    max_running_jobs: int = Field(1, ge=1)
    # How long an online-RL job waits for a rollout, reward or registry service that stays
    # unreachable (after its client's own retries) before it fails UNAVAILABLE naming it.
    outage_timeout_s: float = Field(600.0, gt=0)
    # Times a job's worker that died without a word (SIGKILL, OOM, a segfault) is started
    # again from its last checkpoint before the job fails.
    max_restarts: int = Field(3, ge=0)

    # Where jobs run: "off" (on this host, the default), "multi_node" (jobs whose plan has
    # num_nodes > 1 run as a Kubernetes indexed Job, the others here) or "all" (every job).
    kubernetes_jobs: Literal["off", "multi_node", "all"] = "off"
    # The Job template (a file: a headless Service and an indexed Job, placeholders as in
    # deploy/k8s/multinode/job.yaml); needed unless kubernetes_jobs is "off".
    kubernetes_template: Path | None = None
    # The workers' image (the trainer's own GPU image); needed unless kubernetes_jobs is "off".
    kubernetes_image: str = ""
    # Unset: the trainer pod's own namespace (in the cluster), else the kubeconfig's.
    kubernetes_namespace: str = ""
    # The ReadWriteMany claim holding the job folders, mounted in every job pod at the path the
    # trainer has them (<data_dir>/trainer/jobs), where the trainer mounts it too.
    kubernetes_volume_claim: str = "trainer-jobs-rwx"
    # The nodes of this trainer's inventory when jobs run on Kubernetes: the most an explicit
    # plan may ask for (num_nodes), and what an auto plan takes (bounded by max_devices).
    kubernetes_max_nodes: int = Field(2, ge=1)
    # A job pod that is still unschedulable or cannot pull its image (or start its container)
    # after this long fails the job with the pod's reason.
    kubernetes_start_timeout_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _kubernetes_complete(self) -> TrainerSettings:
        if self.kubernetes_jobs != "off" and (
            not self.kubernetes_image or not self.kubernetes_template
        ):
            raise ValueError(
                f"kubernetes_jobs={self.kubernetes_jobs} needs kubernetes_image and "
                "kubernetes_template (TLM_TRAINER_KUBERNETES_IMAGE, _TEMPLATE)"
            )
        return self

    def max_nodes(self) -> int:
        """The nodes one job may use: one (this host) unless jobs run on Kubernetes."""
        return 1 if self.kubernetes_jobs == "off" else self.kubernetes_max_nodes
