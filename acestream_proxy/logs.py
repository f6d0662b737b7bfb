"""
What the daemon does as a twistd process beyond its services: the log in
JSON when asked (one object per line, with each event's structured fields,
for journald or Loki), and a failure to listen reported in one line with
exit status 1 instead of a traceback.
"""

import os
import sys

from twisted.application.service import MultiService
from twisted.logger import ILogObserver, jsonFileLogObserver
from twisted.python.logfile import LogFile

from .http.listening import ListenFailed


def log_file(server_options):
    """
    Where twistd would write its log: standard output with C{-n} and no
    C{--logfile} (or C{--logfile -}), else the log file (C{twistd.log} by
    default).
    """
    name = server_options.get("logfile") or ""
    if name == "-" or (not name and server_options.get("nodaemon")):
        return sys.stdout
    return LogFile.fromFullPath(name or "twistd.log")


def json_observer(server_options):
    """
    An observer writing each event as one JSON object on its own line
    (Twisted's own JSON form, which C{twisted.logger.eventsFromJSONLogFile}
    reads back), where twistd would write its text.  The record separator
    Twisted puts before each object by default is left out: every line is
    JSON by itself.
    """
    return jsonFileLogObserver(log_file(server_options), recordSeparator="")


class Daemon(MultiService):
    """
    The proxy's service tree as twistd runs it.

    twistd takes its log observer from the application, when no C{--logger}
    is given, and the plugin's service is the application's only child: so
    the JSON observer is handed over as the application's L{ILogObserver}
    when the service joins it.  And a listener that cannot listen ends the
    process with one line on standard error and status 1; twistd would print
    a traceback of some forty lines.
    """

    def __init__(self, service, observer=None, pidfile: str | None = None, stderr=None) -> None:
        super().__init__()
        service.setServiceParent(self)
        self.observer = observer
        self.pidfile = pidfile
        self.stderr = stderr

    def setServiceParent(self, parent):
        if self.observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)
        return super().setServiceParent(parent)

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except ListenFailed as e:
            self.fail(str(e))

    def startService(self):
        try:
            super().startService()
        except ListenFailed as e:
            self.fail(str(e))

    def fail(self, message: str):
        """
        End the process at startup with C{message} as its only line on
        standard error; the pid file twistd wrote, which it would remove on
        an error, is removed too.
        """
        # twistd has sent sys.stderr to the log by now: the process's own
        # standard error is sys.__stderr__.
        stderr = self.stderr or sys.__stderr__
        stderr.write(f"aceproxy: {message}\n")
        stderr.flush()
        if self.pidfile:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass
        raise SystemExit(1)
