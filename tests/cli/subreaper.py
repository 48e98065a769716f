#!/usr/bin/env python3
"""Run a command as a child subreaper that never reaps orphans, as PID 1 of many containers (and of CI)
does not: a process the command leaves behind, zombie or alive, is then still visible when it exits.
Exits with the command's status; prints `left behind: PID STATE CMD` on stderr for each leftover.
  subreaper.py CMD [ARGS...]"""
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("subreaper.py: prctl(PR_SET_CHILD_SUBREAPER) failed")
child = subprocess.Popen(sys.argv[1:])
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # a signal for the job goes to the command
    signal.signal(sig, lambda s, _f: child.send_signal(s))
rc = child.wait()  # reaps only this child
time.sleep(0.5)  # orphans are reparented to us at their parent's exit: give a dying one a moment
me = os.getpid()
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        with open(f"/proc/{d}/stat") as f:
            stat = f.read()
        with open(f"/proc/{d}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        continue
    fields = stat[stat.rfind(")") + 2:].split()
    if int(fields[1]) == me:
        print(f"left behind: {d} {fields[0]} {cmd or stat[stat.find('(') + 1:stat.rfind(')')]}", file=sys.stderr)
sys.exit(rc if rc >= 0 else 128 - rc)
