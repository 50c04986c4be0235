// Source of the Python 3 helper behind pty-relay.ts, run as
// `python3 -c PTY_RELAY_SCRIPT <link> [<bytes/s> [<device transmit buffer bytes>]]`. Stdlib only.
// Why Python: Node has no openpty, and socat keeps both slave fds open, which makes flashtool.py (and any
// "is the port in use" check) refuse the device (Katapult scripts/flashtool.py: validate_device walks /proc/*/fd
// and fails "Serial device ... in use by another program"). The helper owns the pty
// master, CLOSES its slave fd, links the slave at <link> and relays bytes over stdin/stdout.
//
// Framing both ways: 1 type byte, u32 big-endian length, payload.
//   helper -> node: B <u32 BE baud> (first the initial speed, then each change); R <slave path> once linked;
//                   D <bytes from the host>; O (slave opened); C (slave closed).
//   node -> helper: W <u64 BE count of host bytes the device had received when it wrote this> <bytes for the host>.
// With a rate (bytes per second each way, baud/10 for a UART) the helper is the wire: a host chunk crosses from
// when it was read (or the line is free), and bytes for the host leave no earlier than the host bytes they answer
// have crossed, then at the line's pace in ~0.5 ms slices; a device transmit buffer drops an answer that does not
// fit beside the unsent rest, as Katapult's firmware does. Timing lives here, next to the pty, so the hops to and from
// the device model overlap the wire time instead of adding to it: the emulated link costs what a UART costs.
// Reads on the master fail with EIO while no process has the slave open: that is "closed", not an error.
// The slave's line speed is read with TCGETS2 (ispeed/ospeed at offsets 36/40) about every 20 ms.
// Exit codes: 0 when stdin closes (the parent is gone or closed the relay), 3 when <link> exists and is not a
// symlink (never replace a real file or device node).

export const PTY_RELAY_EXIT_NOT_A_LINK = 3;

export const PTY_RELAY_SCRIPT = String.raw`
import collections, errno, fcntl, os, select, signal, stat, struct, sys, termios, time, tty

TCGETS2 = 0x802C542A  # _IOR('T', 0x2A, struct termios2): x86-64, arm, arm64, riscv
POLL_S = 0.02
SPIN_S = 0.0


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


class Wire:
    """
    Schedules bytes across a line of rate bytes per second each way; rate 0 means instant. With tx_buffer, the
    device side has a transmit buffer of that many bytes: a write that does not fit beside its unsent bytes, at
    the moment the device answered, is dropped whole (Katapult's console_sendf in src/generic/serial_irq.c).
    """

    def __init__(self, rate, tx_buffer):
        self.rate = rate
        self.tx_buffer = tx_buffer
        self.received = 0                   # host bytes read so far
        self.arrivals = collections.deque() # (first, end, start): host chunk [first, end) crossing from start
        self.in_free = 0.0
        self.out_free = 0.0
        self.held = collections.deque()     # (release time, bytes) for the host, in order

    def from_host(self, data):
        if self.rate:
            start = max(time.monotonic(), self.in_free)
            self.in_free = start + len(data) / self.rate
            self.arrivals.append((self.received, self.received + len(data), start))
        self.received += len(data)

    def crossed(self, count):
        """When host byte number count (1-based) finished crossing; counts only grow, so older chunks go."""
        while self.arrivals and self.arrivals[0][1] < count:
            self.arrivals.popleft()
        for first, end, start in self.arrivals:
            if first < count <= end:
                return start + (count - first) / self.rate
        return 0.0

    def to_host(self, data, answered, out):
        if not self.rate:
            out += data
            return
        crossed = self.crossed(answered)
        # The device answers when the request has crossed, even if the model's answer reached us later.
        at = crossed or time.monotonic()
        unsent = max(0.0, (self.out_free - at) * self.rate)
        if self.tx_buffer and unsent + len(data) > self.tx_buffer + 0.5:
            return
        begin = max(time.monotonic(), self.out_free, crossed)
        # ~0.5 ms slices: a UART's bytes reach the host a few at a time, not as one lump per frame.
        step = max(1, int(self.rate / 2000))
        for i in range(0, len(data), step):
            part = data[i:i + step]
            self.held.append((begin + (i + len(part)) / self.rate, part))
        self.out_free = begin + len(data) / self.rate

    def release(self, out):
        """Moves due bytes to out; returns how long until the next ones are due (None: nothing held)."""
        now = time.monotonic()
        if self.held and self.held[0][0] - now < SPIN_S:
            # select() wakes ~0.1 ms late on a busy machine; the last stretch is waited out here.
            while time.monotonic() < self.held[0][0]:
                pass
            now = time.monotonic()
        while self.held and self.held[0][0] <= now:
            out += self.held.popleft()[1]
        return max(0.0, self.held[0][0] - now - SPIN_S) if self.held else None

    def clear(self):
        self.held.clear()


def main():
    link = sys.argv[1]
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    tx_buffer = int(sys.argv[3]) if len(sys.argv) > 3 else 0
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
        relay(master, slave_path, Wire(rate, tx_buffer))
    finally:
        try:
            if os.readlink(link) == slave_path:
                os.unlink(link)
        except OSError:
            pass
        os.close(master)


def relay(master, slave_path, wire):
    inbuf = b""
    out = bytearray()
    opened = False
    baud = read_baud(master)
    emit(b"B", struct.pack(">I", baud))
    emit(b"R", slave_path.encode())
    while True:
        due = wire.release(out)
        rlist = [0] + ([master] if opened else [])
        wlist = [master] if opened and out else []
        timeout = POLL_S if due is None else min(POLL_S, due)
        readable, writable, _ = select.select(rlist, wlist, [], timeout)
        if 0 in readable:
            chunk = os.read(0, 65536)
            if not chunk:
                for _, part in wire.held:
                    out += part
                flush(master, out, opened)
                return
            inbuf += chunk
            while len(inbuf) >= 5:
                size = struct.unpack(">I", inbuf[1:5])[0]
                if len(inbuf) < 5 + size:
                    break
                if opened:
                    answered = struct.unpack(">Q", inbuf[5:13])[0]
                    wire.to_host(inbuf[13:5 + size], answered, out)
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
                wire.clear()
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
            wire.from_host(data)
            emit(b"D", data)
        wire.release(out)
        if out:
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


try:
    # Wake from select within ~1 us of a release time rather than the default 50 us (PR_SET_TIMERSLACK).
    import ctypes
    ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)
except (OSError, AttributeError):
    pass
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
# Ctrl-C reaches the whole process group; the parent decides when the relay ends (by closing stdin).
signal.signal(signal.SIGINT, signal.SIG_IGN)
main()
`;
