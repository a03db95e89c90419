"""A consumer in a process of its own whose listener answers with a big table, so that
encoding it does not share the test's interpreter (and its lock) with the provider.

``python table_listener_process.py ADDRESS ENTRIES``: a sync Client that passes a
``TableListener(ENTRIES)`` to ``test.Tables.add``, says ready, and serves its calls until
killed.
"""

import sys
import threading

from services import TableListener, Tables

import backchannel

if __name__ == "__main__":
    address, entries = sys.argv[1], int(sys.argv[2])
    client = backchannel.Client(address, timeout=30)
    client.reference(Tables).add(TableListener(entries))
    print("ready", flush=True)
    threading.Event().wait()  # until killed
