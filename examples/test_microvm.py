# A complete pymvm integration test (README, "Testing with pymvm"): pytest examples/test_microvm.py


def test_guest_runs_commands_and_keeps_files(microvm):
    result = microvm.run("uname -s; echo oops >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, "Linux\n", "oops\n")
    microvm.put(b"\x00binary\xff", "/tmp/data")
    assert microvm.get("/tmp/data") == b"\x00binary\xff"
