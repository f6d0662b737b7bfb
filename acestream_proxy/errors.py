"""
Failures a player or an API caller is told about, each with its HTTP status.
The web layer turns any of them into C{{"error": message}} JSON.
"""


class ProxyError(Exception):
    """
    A failure with a message fit to show a client.
    """

    status = 500

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class BadRequest(ProxyError):
    status = 400


class Unauthorized(ProxyError):
    status = 401


class Forbidden(ProxyError):
    status = 403


class NotFound(ProxyError):
    status = 404


class NoEngine(ProxyError):
    """
    No healthy engine can take the stream.  The message names the engines
    tried and why each failed; C{retry_after} is sent as C{Retry-After},
    since an engine starting up is usually there seconds later.
    """

    status = 503

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ProxyError):
    """
    The proxy is shutting down or at a limit, or its store is down.

    @ivar retry_after: seconds after which trying again makes sense, sent
        as C{Retry-After}; L{None} to send none.
    """

    status = 503

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineError(ProxyError):
    """
    The engine answered an error, or something that is not its API.
    """

    status = 502


class EngineTimeout(EngineError):
    """
    The engine did not answer in time.
    """

    status = 504
