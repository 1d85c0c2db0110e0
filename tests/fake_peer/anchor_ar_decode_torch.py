"""Stand-in for the peer's decode anchor: made-up records (not measurements) in its format; after
the first (the one the driver needs) it waits, as the real one would while timing the rest."""
import json
import os
import time

print("a line that is not JSON", flush=True)
rows = []
for batch, gen in ((1, 1024), (1, 256), (64, 1024)):
    row = dict(model="130m", batch=batch, prompt=32, gen=gen, ar_decode_ms=1000.0 * gen / 1024,
               parallel_forward_ms=5.0, floor_T64_ms=320.0, speedup_bound_T64=3.0, params_m=129.0)
    rows.append(row)
    print(json.dumps(row), flush=True)
    time.sleep(60)
json.dump(rows, open(os.path.join(os.environ["OUT"], "peer_ar_decode.json"), "w"))
