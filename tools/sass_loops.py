"""The loops of one kernel's SASS (`cuobjdump -sass -fun NAME`): for each backward branch,
the loop's address range, its static instruction count and its opcode mix, so a change to a
kernel's main loop can be counted before it is timed (docs/kernels.md §6 counts the skinny
and `wgmma` loops this way). A loop's static count includes its cold branches (a group's
record decode, say); read the listing for the hot path.

    python3 tools/sass_loops.py KERNEL.sass [MIN_INSTRUCTIONS]
"""
import collections
import re
import sys


def main(path, min_len=20):
    ins = []
    for line in open(path):
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    for i, (addr, text) in enumerate(ins):
        target = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if not target:
            continue
        start = int(target.group(1), 16)
        if start > addr or start not in index:
            continue
        body = ins[index[start]: i + 1]
        if len(body) < min_len:
            continue
        # Opcode without predicate and modifiers: `@!P0 LDS.128` -> `LDS`.
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for _, t in body)
        mma = ops.get("HMMA", 0) + ops.get("HGMMA", 0)
        print(f"loop {start:#06x}-{addr:#06x}: {len(body)} instructions, {mma} MMA")
        print("   ", ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20)
