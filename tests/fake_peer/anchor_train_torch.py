"""Stand-in for the peer's train-step anchor: made-up records (not measurements) in its format."""
import json
import os

rows = [dict(model="130m", params_m=129.0, batch=16, L=1024, step_ms=200.0, tokens_per_s=81920.0,
             mfu_6nd=0.08),
        dict(model="370m", params_m=372.0, batch=16, L=1024, step_ms=400.0, tokens_per_s=40960.0,
             mfu_6nd=0.11)]
for row in rows:
    print(json.dumps(row), flush=True)
json.dump(rows, open(os.path.join(os.environ["OUT"], "peer_train.json"), "w"))
