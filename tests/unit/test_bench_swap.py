"""bench/swap: the script's summary arithmetic and its UDP stream (its wrapper: test_bench_wrappers.py)."""

from __future__ import annotations

from .script_loader import load_bench


def _load():
    return load_bench("swap.py", "bench_swap")


def test_summary_is_the_median_gap_and_loss_and_the_cycle_visits_every_kind() -> None:
    bench = _load()
    samples = [{"gap_ms": g, "lost": lo, "sent": 100} for g, lo in ((5, 1), (50, 9), (7, 2))]
    assert bench.summary(samples) == (7, 2)
    names = [bench.NAMES[t] for t in bench.CYCLE]
    assert names == ["builtin", "dpdk", "builtin", "vhost-net"]  # from vhost-net and back


def test_the_udp_stream_measures_gaps_and_losses_while_its_threads_run() -> None:
    # Against a Python echo on loopback that drops datagrams 500-999: one gap, 500 lost.
    import socket
    import threading
    import time

    from pymvm.testing.udp import UdpStream

    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = echo.recvfrom(2048)
            except OSError:
                continue
            if not 500 <= int.from_bytes(data[:8], "big") < 1000:
                echo.sendto(data, peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    stream = UdpStream("127.0.0.1", "127.0.0.1", pps=1000, port=echo.getsockname()[1])
    try:
        t0 = time.monotonic()
        assert stream.wait_flowing(10)
        time.sleep(2.5)
        windows = [stream.window(t0, time.monotonic()) for _ in range(20)]  # while sending
    finally:
        stream.close()
        stop.set()
        t.join(5)
        echo.close()
    w = windows[-1]
    # A sender held up by a loaded machine skips slots (never sent, never lost): every one of
    # 500-999 that went out is lost, and beyond them only the last few still on their way.
    dropped = sum(1 for seq in stream.sent if 500 <= seq < 1000)
    assert dropped >= 250 and dropped <= w["lost"] <= dropped + 100 and w["gap_ms"] >= 400, \
        (w, dropped)


def test_handover_times_are_read_from_the_vmms_json_lines_among_console_output(tmp_path) -> None:
    bench = _load()
    log = tmp_path / "vm.log"
    log.write_text(
        "[    1.0] guest console line\n"
        '{"event": "net_backend_swapped", "stop_ms": 12.5, "start_ms": 30.0, "level": "info"}\n'
        '{"event": "vhost_user_activated", "level": "info"}\n'
        "garbage {not json\n"
        '{"event": "net_backend_swapped", "stop_ms": 1.0, "start_ms": 2.0}\n')
    assert bench.handover_times(log) == [42.5, 3.0]


def test_the_udp_stream_stops_sending_but_still_takes_the_echoes() -> None:
    import socket
    import threading
    import time

    from pymvm.testing.udp import UdpStream

    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(0.2)
    held: list[tuple[bytes, tuple]] = []
    done = threading.Event()

    def hold_then_echo() -> None:  # echoes come back late, after the sender stopped
        while not done.is_set():
            try:
                held.append(echo.recvfrom(2048))
            except OSError:
                continue

    t = threading.Thread(target=hold_then_echo, daemon=True)
    t.start()
    stream = UdpStream("127.0.0.1", "127.0.0.1", pps=500, port=echo.getsockname()[1])
    try:
        time.sleep(0.5)
        stream.stop_sending()
        sent = len(stream.sent)
        time.sleep(0.3)
        assert len(stream.sent) == sent > 0  # nothing more goes out
        done.set()
        t.join(2)
        for data, addr in held:
            echo.sendto(data, addr)
        deadline = time.monotonic() + 5
        while len(stream.received) < len(held) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stream.received) == len(held) == sent
    finally:
        stream.close()
        echo.close()


def test_a_held_up_udp_sender_skips_the_missed_datagrams_instead_of_bursting() -> None:
    # The sender is held for 0.5 s (its lock taken, as a starved thread would be): afterwards
    # it must not send the ~500 datagrams it missed at once; at most max_burst go out together.
    import socket
    import time

    from pymvm.testing.udp import UdpStream

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    stream = UdpStream("127.0.0.1", "127.0.0.1", pps=1000, port=sink.getsockname()[1])
    try:
        time.sleep(0.3)
        with stream._lock:
            held_at = time.monotonic()
            time.sleep(0.5)
        time.sleep(0.3)
    finally:
        stream.close()
        sink.close()
    after = sorted(t for t in stream.sent.values() if t > held_at + 0.5)
    first_10ms = [t for t in after if t < after[0] + 0.010]
    assert after and len(first_10ms) <= stream.max_burst + 10, len(first_10ms)
    numbers = sorted(stream.sent)
    skipped = numbers[-1] + 1 - len(numbers)  # numbers never sent, from 0 on
    assert skipped >= 300, skipped  # the missed slots were skipped, not sent late


def test_the_udp_stream_timeline_counts_sent_and_echoed_per_second() -> None:
    from pymvm.testing.udp import UdpStream

    stream = UdpStream.__new__(UdpStream)  # the bookkeeping alone: no sockets, no threads
    stream._lock = __import__("threading").Lock()
    stream.sent = {0: 10.1, 1: 10.6, 2: 11.2, 3: 12.9, 4: 13.5}
    stream.received = {0: 10.2, 2: 11.4, 4: 13.6}
    assert stream.timeline(10.0, 13.0) == [[0.0, 2, 1], [1.0, 1, 1], [2.0, 1, 0]]
    assert stream.timeline(10.0, 14.0, step=2.0) == [[0.0, 3, 2], [2.0, 2, 1]]
    assert stream.timeline(10.0, 10.5) == []
