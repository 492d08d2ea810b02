"""One client per TLM service: typed asyncio calls over one channel each, API key and team in
metadata, deadlines, gRPC retries of UNAVAILABLE (and DEADLINE_EXCEEDED for reads and calls with
a request id), and remote errors turned into domain errors by `errors.to_domain`.

    from services.clients import RewardClient
    async with RewardClient("reward:50051", api_key="k-123") as reward:
        request = rs.ScoreRequest(evaluator="evaluators/math/revisions/prod", samples=[...])
        results = (await reward.score(request)).results

The README's "Clients" section says more; services/clients/errors.py is the error classifier.
"""

from services.clients.deploy import DeployClient
from services.clients.registry import RegistryClient
from services.clients.reward import RewardClient
from services.clients.rollout import RolloutClient
from services.clients.trainer import TrainerClient

__all__ = ["DeployClient", "RegistryClient", "RewardClient", "RolloutClient", "TrainerClient"]
