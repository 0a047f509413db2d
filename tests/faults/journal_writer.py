"""One of several processes writing one journal at once (issue 15, item 9).

``python journal_writer.py PATH WRITER SECONDS MAX_BYTES BACKUPS``: writes numbered records
(``writer``, ``seq``) through :class:`memwarden.journal.Journal` until SECONDS have passed,
a few at a time with a short pause (a busy worker's rate), then prints how many it wrote.
"""

from __future__ import annotations

import sys
import time

from memwarden.journal import Journal


def main() -> int:
    path, writer, seconds, max_bytes, backups = sys.argv[1:6]
    journal = Journal(path, max_bytes=int(max_bytes), backups=int(backups), ring=1)
    end = time.monotonic() + float(seconds)
    seq = 0
    while time.monotonic() < end:
        for _ in range(20):
            journal.write("w", writer=int(writer), seq=seq, pad="x" * 120)
            seq += 1
        time.sleep(0.002)
    journal.close()
    print(seq, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
