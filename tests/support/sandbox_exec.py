"""Run a command under the memory and system-call restrictions a systemd unit
imposes, without systemd: the kernel's MDWE (MemoryDenyWriteExecute=yes) and a
seccomp allow-list (SystemCallFilter=, SystemCallErrorNumber=EPERM) built with
libseccomp through ctypes. Both are inherited across execve.

    python sandbox_exec.py [--mdwe] [--allow FILE] -- command args...

FILE lists the allowed system call names, one per line. Exit 97: the kernel or
libseccomp refused to set a restriction up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_EPERM = 0x00050000 | errno.EPERM


def fail(message: str) -> None:
    print(f"sandbox_exec: {message}", file=sys.stderr, flush=True)
    sys.exit(97)


def main(argv: list[str]) -> None:
    separator = argv.index("--")
    options, command = argv[:separator], argv[separator + 1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # NoNewPrivileges=yes
        fail(f"PR_SET_NO_NEW_PRIVS: {os.strerror(ctypes.get_errno())}")
    if "--mdwe" in options and libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        fail(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
    if "--allow" in options:
        names = open(options[options.index("--allow") + 1]).read().split()
        path = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        seccomp = ctypes.CDLL(path, use_errno=True)
        seccomp.seccomp_init.restype = ctypes.c_void_p
        seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
        seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
        seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
        context = seccomp.seccomp_init(SCMP_ACT_ERRNO_EPERM)
        if not context:
            fail("seccomp_init failed")
        for name in names:
            number = seccomp.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not a system call on this architecture
            if seccomp.seccomp_rule_add(context, SCMP_ACT_ALLOW, number, 0) != 0:
                fail(f"seccomp_rule_add {name}")
        if seccomp.seccomp_load(context) != 0:
            fail("seccomp_load failed")
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
