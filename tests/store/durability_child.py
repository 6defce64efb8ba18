"""Child process of the durability test: append forever, report each UID once durable.

Usage: python durability_child.py BACKEND LOCATION MAILBOX_ID

Several concurrent writers append messages; each prints ``uid payload-hex`` only after its
``async with store.write()`` block has exited, i.e. when the store says the message is
durable. The parent SIGKILLs this process at an arbitrary moment and checks that every
printed UID is in the store with its bytes.
"""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from store_backends import make_store

WRITERS = 8


async def main(backend: str, location: str, mailbox_id: int) -> None:
    store = make_store(backend, location)
    await store.open()
    out = sys.stdout

    async def writer(n: int) -> None:
        seq = 0
        while True:
            payload = f"writer {n} message {seq}\r\n".encode() * (1 + seq % 7)
            seq += 1
            async with store.write() as tx:
                blob = await tx.put_blob(payload)
                uid = await tx.append(mailbox_id, blob)
            # Only now may the data be acknowledged.
            out.write(f"{uid} {payload.hex()}\n")
            out.flush()

    await asyncio.gather(*(writer(n) for n in range(WRITERS)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
