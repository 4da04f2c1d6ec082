import re,sys,collections
def entries(path):
    s=open(path).read()
    out={}
    for m in re.finditer(r'\.entry (\w+)\((.*?)\)\n(.*?)\n}\n', s, re.S):
        name, params, body = m.group(1), m.group(2), m.group(3)
        ops=[]
        for line in body.splitlines():
            line=line.strip()
            if not line or line.startswith('//') or line.startswith('.reg') or line.startswith('$L') or line.startswith('{') or line.startswith('}'): continue
            op=line.split()[0]
            if op.startswith('@'): op=line.split()[1]
            ops.append(op)
        out[name]=(params.strip(), ops)
    return out
a=entries(sys.argv[1]); b=entries(sys.argv[2])
for n in sorted(set(a)|set(b)):
    if n not in a or n not in b: print(f"{n}: only in {'before' if n in a else 'after'}"); continue
    ca=collections.Counter(o for o in a[n][1] if not o.startswith('ld.param')); cb=collections.Counter(o for o in b[n][1] if not o.startswith('ld.param'))
    diff={k:cb[k]-ca[k] for k in set(ca)|set(cb) if cb[k]!=ca[k]}
    print(f"{n:24s} before {len(a[n][1]):6d} after {len(b[n][1]):6d} ops; param {b[n][0][:60]!r}; opcode-count diff {diff if diff else 'none'}")
