#!/usr/bin/env python3
"""Generate EXP2_FRAC_Q63 for crates/forge-numerics/src/qmeta.rs.

Entry j is round(2^(j/256) * 2^63), computed with 60 significant decimal digits, so the
u64 fixed-point value is exact to half a unit in its last place (2^-63 relative). qmeta4
decode rounds it to f32 (24 bits or fewer), which leaves 39+ guard bits.
"""
from decimal import Decimal, getcontext, ROUND_HALF_EVEN

getcontext().prec = 60
two = Decimal(2)
rows = []
for j in range(256):
    v = (two ** (Decimal(j) / 256)) * (two ** 63)
    rows.append(int(v.to_integral_value(rounding=ROUND_HALF_EVEN)))
for i in range(0, 256, 4):
    print("    " + " ".join(f"0x{v:016x}," for v in rows[i:i + 4]))
