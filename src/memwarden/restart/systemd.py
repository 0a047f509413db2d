"""Come back under systemd: tell the manager we are stopping, then exit for ``Restart=``.

With ``NOTIFY_SOCKET`` set (``Type=notify``, or ``NotifyAccess=`` on any unit), send
``STOPPING=1`` and a ``STATUS=`` line saying why over the datagram socket (``sd_notify``;
a leading ``@`` is the abstract namespace), so ``systemctl status`` shows the reason. Then
exit with ``MEMWARDEN_EXIT_CODE`` (75): non-zero, so ``Restart=on-failure`` restarts the
unit; list it in ``RestartForceExitStatus=`` to restart under ``Restart=on-abnormal`` too.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from memwarden.restart.exit import ExitRestarter

if TYPE_CHECKING:
    from memwarden.config import Config

log = logging.getLogger("memwarden")


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """``sd_notify``: send ``message`` to ``$NOTIFY_SOCKET``; False when unset or unreachable."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("memwarden: sd_notify to NOTIFY_SOCKET failed: %s", exc)
        return False


class SystemdRestarter(ExitRestarter):
    name = "systemd"

    def restart(self, reason: str) -> None:
        status = " ".join(f"memwarden: restarting: {reason}".split())
        notify(f"STOPPING=1\nSTATUS={status}")
        super().restart(reason)


def make(config: Config) -> SystemdRestarter:
    return SystemdRestarter(config.exit_code)
