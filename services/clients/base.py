"""What every service client shares: one channel with the retry policy, the caller's metadata
(API key, and the team a service key acts for), deadlines, and errors turned into domain errors
by services/clients/errors.py. Each service's client module subclasses it; nothing else calls a
stub."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.descriptor import FileDescriptor

from services.clients.errors import to_domain
from services.common.client import RetryPolicy, aio_channel, call_metadata, resolve_address

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]


class ServiceClient:
    """An asyncio client of one service at `address` (default: TLM_<SERVICE>_ADDRESS, then
    TLM_ADDRESS, then localhost:50051). `team` is sent with service keys; `timeout_s` is the
    default deadline of each call (None: none); `retry` the policy (default: from TLM_CLIENT_*);
    `credentials` TLS for this channel (default: from TLM_TLS_CA_FILE; `insecure`: plaintext
    whatever the environment says); `metadata` replaces the API key and team. Use as
    `async with` or call `close()`."""

    service = ""  # "registry", "reward", ...: names the service in errors
    descriptor: FileDescriptor  # the proto file that defines the service
    stub_class: Any

    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        team: str | None = None,
        *,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        insecure: bool = False,
        metadata: Metadata | None = None,
    ) -> None:
        self.address = resolve_address(self.service, address)
        self.retry = retry or RetryPolicy.from_env()
        services = list(self.descriptor.services_by_name.values())
        self._channel = aio_channel(
            self.address,
            self.retry.channel_options(services),
            credentials=credentials,
            insecure=insecure,
        )
        self.stub = self.stub_class(self._channel)
        self._api_key, self._team = api_key, team
        self._metadata = metadata
        self.timeout_s = timeout_s

    def metadata(self, team: str | None = None) -> Metadata:
        """The call metadata: fixed `metadata` if given, else the API key and team."""
        if self._metadata is not None:
            return self._metadata
        return call_metadata(self._api_key, team or self._team)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    async def _call(
        self,
        rpc: Callable[..., Awaitable[T]],
        request: Any,
        team: str | None = None,
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
    ) -> T:
        """One unary (or client-streaming) call; gRPC retries it by the channel's policy."""
        metadata = self.metadata(team) if metadata is None else metadata
        try:
            return await rpc(request, metadata=metadata, timeout=self._timeout(timeout_s))
        except grpc.RpcError as exc:
            raise to_domain(exc, self.service, self.address) from exc

    async def _every_page(self, rpc: Any, request: Any, items: str, team: str | None) -> list[Any]:
        """The `items` of every page of a List call, following next_page_token."""
        found: list[Any] = []
        while True:
            response = await self._call(rpc, request, team)
            found.extend(getattr(response, items))
            if not response.next_page_token:
                return found
            request.page_token = response.next_page_token

    async def _stream(
        self,
        rpc: Callable[..., Any],
        request: Any,
        team: str | None = None,
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[Any]:
        """The responses of a server-streaming call. gRPC retries it by the channel's policy
        only until the first response arrives; a consumer that stops early cancels the call."""
        metadata = self.metadata(team) if metadata is None else metadata
        call = rpc(request, metadata=metadata, timeout=self._timeout(timeout_s))
        try:
            async for response in call:
                yield response
        except grpc.RpcError as exc:
            raise to_domain(exc, self.service, self.address) from exc
        finally:
            call.cancel()
