"""A from-the-spec OCP MX v1.0 reference, one Python float at a time (shared by the MX tests).

Nothing here is read from fp8train: the element formats are written out from the spec's tables,
and quantization follows its section 6.3 (shared exponent ``floor(log2(amax)) - emax``, elements
rounded to nearest even, saturating). Not a test module.
"""

import bisect
import math

# Written out from OCP MX v1.0 tables, not read from fp8train: (ebits, mbits, emax, max)
SPEC = {
    "fp8_e4m3": (4, 3, 8, 448.0),
    "fp8_e5m2": (5, 2, 15, 57344.0),
    "fp6_e2m3": (2, 3, 2, 7.5),
    "fp6_e3m2": (3, 2, 4, 28.0),
    "fp4_e2m1": (2, 1, 2, 6.0),
}


def spec_grid(elem_dtype):
    """Sorted non-negative representable magnitudes, so that list index parity = mantissa LSB."""
    ebits, mbits, _, vmax = SPEC[elem_dtype]
    bias = 2 ** (ebits - 1) - 1
    grid = [m * 2.0 ** (1 - bias - mbits) for m in range(2**mbits)]  # subnormals (and 0)
    for e in range(1, 2**ebits):
        grid += [(1 + m / 2**mbits) * 2.0 ** (e - bias) for m in range(2**mbits)]
    return [v for v in grid if v <= vmax]  # drops e4m3's NaN code and e5m2's inf/NaN


def spec_round(y, grid):
    """Round |y| <= max to the nearest grid value; ties to the even-indexed (even mantissa) one."""
    a = min(abs(y), grid[-1])
    hi = bisect.bisect_left(grid, a)  # grid[hi - 1] < a <= grid[hi]
    candidates = [j for j in (hi - 1, hi) if 0 <= j < len(grid)]
    i = min(candidates, key=lambda j: (abs(grid[j] - a), j % 2))
    return math.copysign(grid[i], y)


def spec_quantize(x, elem_dtype, block_size):
    """Reference MX quantize-dequantize of a 2-D fp32 tensor, one scalar at a time.

    Returns (biased scale bytes [rows][blocks], dequantized values [rows][K] as Python floats).
    """
    _, _, emax, _ = SPEC[elem_dtype]
    grid = spec_grid(elem_dtype)
    rows = x.tolist()
    scales, values = [], []
    for row in rows:
        k = len(row)
        row = row + [0.0] * ((-k) % block_size)
        srow, vrow = [], []
        for b in range(0, len(row), block_size):
            block = row[b : b + block_size]
            if any(math.isnan(v) or math.isinf(v) for v in block):
                srow.append(255)
                vrow += [math.nan] * block_size
                continue
            amax = max(abs(v) for v in block)
            exp = -127 if amax == 0 else max(-127, min(127, math.floor(math.log2(amax)) - emax))
            srow.append(exp + 127)
            vrow += [spec_round(v / 2.0**exp, grid) * 2.0**exp for v in block]
        scales.append(srow)
        values.append(vrow[:k])
    return scales, values
