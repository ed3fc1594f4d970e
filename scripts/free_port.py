"""Prints a free loopback TCP port below the kernel's ephemeral range (32768 and up), for a node
that must know its port before it starts: unlike a released ephemeral port, no port-0 listener
or outgoing connection is handed it meanwhile."""
import random
import socket

while True:
    port = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
