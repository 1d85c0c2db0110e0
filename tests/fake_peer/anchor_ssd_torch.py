"""Stand-in for the peer's SSD anchor: made-up records (not measurements) in its format."""
import json
import os

rows = []
for i, (name, b, l, h) in enumerate((("130m-L2k", 8, 2048, 24), ("130m-L8k", 2, 8192, 24),
                                     ("1.3b-L2k", 8, 2048, 64), ("130m-L32k", 1, 32768, 24))):
    row = dict(name=name, b=b, l=l, h=h, p=64, n=128, q=256, fwd_ms=1.0 + i, fwdbwd_ms=4.0 + i,
               fwd_ms_wall5=1.5 + i, fwdbwd_ms_wall5=3.5 + i, fwd_tflops=1.0, fwdbwd_tflops=1.0)
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump(rows, open(os.path.join(os.environ["OUT"], "peer_ssd.json"), "w"))
