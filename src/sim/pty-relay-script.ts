// Source of the Python 3 helper behind pty-relay.ts, run as `python3 -c PTY_RELAY_SCRIPT <link>`. Stdlib only.
// Why Python: Node has no openpty, and socat keeps both slave fds open, which makes flashtool.py (and any
// "is the port in use" check) refuse the device (shared/reference/flashing.md §3). The helper owns the pty
// master, CLOSES its slave fd, links the slave at <link> and relays bytes over stdin/stdout.
//
// Framing both ways: 1 type byte, u32 big-endian length, payload.
//   helper -> node: B <u32 BE baud> (first the initial speed, then each change); R <slave path> once linked;
//                   D <bytes from the host>; O (slave opened); C (slave closed).
//   node -> helper: W <bytes for the host>.
// Reads on the master fail with EIO while no process has the slave open: that is "closed", not an error.
// The slave's line speed is read with TCGETS2 (ispeed/ospeed at offsets 36/40) about every 20 ms.
// Exit codes: 0 when stdin closes (the parent is gone or closed the relay), 3 when <link> exists and is not a
// symlink (never replace a real file or device node).

export const PTY_RELAY_EXIT_NOT_A_LINK = 3;

export const PTY_RELAY_SCRIPT = String.raw`
import errno, fcntl, os, select, signal, stat, struct, sys, termios, tty

TCGETS2 = 0x802C542A  # _IOR('T', 0x2A, struct termios2): x86-64, arm, arm64, riscv
POLL_S = 0.02


def emit(kind, payload=b""):
    data = kind + struct.pack(">I", len(payload)) + payload
    while data:
        data = data[os.write(1, data):]


def read_baud(fd):
    try:
        raw = fcntl.ioctl(fd, TCGETS2, bytes(44))
        return struct.unpack_from("<I", raw, 40)[0]
    except OSError:
        # No termios2 on this architecture: map the classic Bnnn constant.
        speed = termios.tcgetattr(fd)[5]
        for name in dir(termios):
            if name.startswith("B") and name[1:].isdigit() and getattr(termios, name) == speed:
                return int(name[1:])
        return 0


def main():
    link = sys.argv[1]
    try:
        if not stat.S_ISLNK(os.lstat(link).st_mode):
            sys.stderr.write("%s exists and is not a symlink; refusing to replace it\n" % link)
            sys.exit(3)
    except FileNotFoundError:
        pass
    master, slave = os.openpty()
    tty.setraw(slave)
    slave_path = os.ttyname(slave)
    os.close(slave)
    os.set_blocking(master, False)
    tmp = "%s.%d.tmp" % (link, os.getpid())
    os.symlink(slave_path, tmp)
    os.replace(tmp, link)
    try:
        relay(master, slave_path)
    finally:
        try:
            if os.readlink(link) == slave_path:
                os.unlink(link)
        except OSError:
            pass
        os.close(master)


def relay(master, slave_path):
    inbuf = b""
    out = bytearray()
    opened = False
    baud = read_baud(master)
    emit(b"B", struct.pack(">I", baud))
    emit(b"R", slave_path.encode())
    while True:
        rlist = [0] + ([master] if opened else [])
        wlist = [master] if opened and out else []
        readable, writable, _ = select.select(rlist, wlist, [], POLL_S)
        if 0 in readable:
            chunk = os.read(0, 65536)
            if not chunk:
                flush(master, out, opened)
                return
            inbuf += chunk
            while len(inbuf) >= 5:
                size = struct.unpack(">I", inbuf[1:5])[0]
                if len(inbuf) < 5 + size:
                    break
                if opened:
                    out += inbuf[5:5 + size]
                inbuf = inbuf[5 + size:]
        data = b""
        gone = False
        if not opened or master in readable:
            try:
                data = os.read(master, 65536)
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                gone = True
        now = read_baud(master)
        if gone:
            if opened:
                # Report the last speed before the close: a 1200-baud close is a USB bootloader request.
                if now != baud:
                    baud = now
                    emit(b"B", struct.pack(">I", baud))
                opened = False
                out.clear()
                emit(b"C")
            elif now != baud:
                # Opened, reconfigured and closed between two polls.
                baud = now
                emit(b"O")
                emit(b"B", struct.pack(">I", baud))
                emit(b"C")
            continue
        if not opened:
            opened = True
            emit(b"O")
        if now != baud:
            baud = now
            emit(b"B", struct.pack(">I", baud))
        if data:
            emit(b"D", data)
        if master in writable and out:
            try:
                del out[:os.write(master, out)]
            except BlockingIOError:
                pass


def flush(master, out, opened):
    # Give pending bytes for the host a moment to leave before the master closes.
    for _ in range(10):
        if not (opened and out):
            return
        try:
            del out[:os.write(master, out)]
        except BlockingIOError:
            select.select([], [master], [], POLL_S)
        except OSError:
            return


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
# Ctrl-C reaches the whole process group; the parent decides when the relay ends (by closing stdin).
signal.signal(signal.SIGINT, signal.SIG_IGN)
main()
`;
