//! Intel AMX (tiles of int8 dot products) for the ternary matmul of several tokens.
//!
//! `TDPBSUD` multiplies a tile of signed bytes (16 tokens × 64 activations) by a tile of
//! unsigned bytes in "VNNI" order (16 rows of 4 consecutive codes for each of 16 weight rows)
//! into 16 × 16 exact i32 sums: one instruction does 16 384 multiply-adds. Activations are
//! tiled where they lie; weight codes are unpacked from I2_S per 16 rows once and reused by
//! every token tile. Sums are exact integers, so results equal every other variant's.
//!
//! Linux hands out the tile state on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which
//! [`available`] makes once per process.

use crate::ternary::RowsArgs;
use std::arch::asm;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Whether the CPU has AMX-INT8 and the OS granted the tile state to this process.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // CPUID.(EAX=7,ECX=0):EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
            let leaf = std::arch::x86_64::__cpuid_count(7, 0);
            if leaf.edx & (3 << 24) != 3 << 24 || !std::is_x86_feature_detected!("avx512f") {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
            const XFEATURE_XTILEDATA: i64 = 18;
            const SYS_ARCH_PRCTL: i64 = 158;
            let ret: i64;
            // SAFETY: arch_prctl only updates this process's permitted extended states.
            unsafe {
                asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
                     in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
            }
            ret == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

/// The tile configuration: palette 1, tiles 0–7 all 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut i = 0;
    while i < 8 {
        c[16 + 2 * i] = 64; // bytes per row
        c[48 + i] = 16; // rows
        i += 1;
    }
    TileConfig(c)
};

thread_local! {
    /// Unpacked weight tiles (two groups of 16 rows × k codes) and a padded activation tile.
    static SCRATCH: RefCell<(Vec<u8>, Vec<i8>, Vec<i32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Rows of I2_S codes times int8 activations with AMX; `a.rows` must be a multiple of 16.
/// Other row counts run their last rows through the AVX-512 kernel.
///
/// # Safety
/// See [`crate::ternary::RowsFn`]; [`available`] must have returned true.
#[cfg(target_arch = "x86_64")]
pub unsafe fn rows_amx(a: &RowsArgs) {
    let full = a.rows & !15;
    if full < a.rows {
        let rest = RowsArgs {
            w: unsafe { a.w.add(full * a.row_bytes) },
            rows: a.rows - full,
            out: unsafe { a.out.add(full) },
            ..*a
        };
        unsafe { crate::ternary::rows_avx512_vnni(&rest) };
    }
    if full == 0 {
        return;
    }
    SCRATCH.with(|s| {
        let (wbuf, qpad, cbuf) = &mut *s.borrow_mut();
        let chunks = a.k / 64;
        // Two 16-row groups of unpacked tiles: chunks × 1 KiB each.
        wbuf.resize(2 * chunks * 1024, 0);
        qpad.resize(16 * a.k, 0);
        cbuf.resize(256, 0);
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
            let mut r = 0;
            while r < full {
                let pair = full - r >= 32;
                unpack_rows(a, r, &mut wbuf[..chunks * 1024]);
                if pair {
                    unpack_rows(a, r + 16, &mut wbuf[chunks * 1024..]);
                }
                let mut t = 0;
                while t < a.tokens {
                    // 32 tokens (two A tiles) while they last: each B tile loaded from L2 then
                    // serves two products, as each A tile does with two row tiles.
                    let tpair = a.tokens - t >= 32;
                    let n = if tpair { 32 } else { (a.tokens - t).min(16) };
                    // A tile of fewer than 16 tokens reads a zero-padded copy and stores to a
                    // scratch tile; the padding rows are never written out.
                    let (q, qstride) = if n >= 16 {
                        (a.q.add(t * a.q_stride), a.q_stride)
                    } else {
                        for i in 0..16 {
                            let dst = &mut qpad[i * a.k..(i + 1) * a.k];
                            if i < n {
                                dst.copy_from_slice(std::slice::from_raw_parts(a.q.add((t + i) * a.q_stride), a.k));
                            } else {
                                dst.fill(0);
                            }
                        }
                        (qpad.as_ptr(), a.k)
                    };
                    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                    let w0 = wbuf.as_ptr();
                    let w1 = wbuf.as_ptr().add(chunks * 1024);
                    let q1 = q.add(16 * qstride);
                    for c in 0..chunks {
                        let (qa, qb) = (q.add(c * 64), q1.add(c * 64));
                        let (b0, b1) = (w0.add(c * 1024), w1.add(c * 1024));
                        match (tpair, pair) {
                            (true, true) => asm!(
                                "tileloadd tmm4, [{qa} + {qs}*1]",
                                "tileloadd tmm5, [{qb} + {qs}*1]",
                                "tileloadd tmm6, [{b0} + {s64}*1]",
                                "tileloadd tmm7, [{b1} + {s64}*1]",
                                "tdpbsud tmm0, tmm4, tmm6",
                                "tdpbsud tmm1, tmm4, tmm7",
                                "tdpbsud tmm2, tmm5, tmm6",
                                "tdpbsud tmm3, tmm5, tmm7",
                                qa = in(reg) qa, qb = in(reg) qb, qs = in(reg) qstride, b0 = in(reg) b0,
                                b1 = in(reg) b1, s64 = in(reg) 64usize, options(nostack, readonly)
                            ),
                            (true, false) => asm!(
                                "tileloadd tmm4, [{qa} + {qs}*1]",
                                "tileloadd tmm5, [{qb} + {qs}*1]",
                                "tileloadd tmm6, [{b0} + {s64}*1]",
                                "tdpbsud tmm0, tmm4, tmm6",
                                "tdpbsud tmm2, tmm5, tmm6",
                                qa = in(reg) qa, qb = in(reg) qb, qs = in(reg) qstride, b0 = in(reg) b0,
                                s64 = in(reg) 64usize, options(nostack, readonly)
                            ),
                            (false, true) => asm!(
                                "tileloadd tmm4, [{qa} + {qs}*1]",
                                "tileloadd tmm6, [{b0} + {s64}*1]",
                                "tileloadd tmm7, [{b1} + {s64}*1]",
                                "tdpbsud tmm0, tmm4, tmm6",
                                "tdpbsud tmm1, tmm4, tmm7",
                                qa = in(reg) qa, qs = in(reg) qstride, b0 = in(reg) b0,
                                b1 = in(reg) b1, s64 = in(reg) 64usize, options(nostack, readonly)
                            ),
                            (false, false) => asm!(
                                "tileloadd tmm4, [{qa} + {qs}*1]",
                                "tileloadd tmm6, [{b0} + {s64}*1]",
                                "tdpbsud tmm0, tmm4, tmm6",
                                qa = in(reg) qa, qs = in(reg) qstride, b0 = in(reg) b0,
                                s64 = in(reg) 64usize, options(nostack, readonly)
                            ),
                        }
                    }
                    // C tile (token half, row half): tmm0 (0,0), tmm1 (0,1), tmm2 (1,0), tmm3 (1,1).
                    for (tile, th, rh) in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)] {
                        if (rh == 1 && !pair) || (th == 1 && !tpair) {
                            continue;
                        }
                        let (t0, r0) = (t + 16 * th, r + 16 * rh);
                        if n >= 16 {
                            store_tile(tile, a.out.add(t0 * a.out_stride + r0), a.out_stride * 4);
                        } else {
                            store_tile(tile, cbuf.as_mut_ptr(), 64);
                            for i in 0..n {
                                std::ptr::copy_nonoverlapping(cbuf.as_ptr().add(16 * i), a.out.add((t0 + i) * a.out_stride + r0), 16);
                            }
                        }
                    }
                    t += n;
                }
                r += if pair { 32 } else { 16 };
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    });
}

/// Stores accumulator tile `tmm0`..`tmm3` to `dst` with `stride` bytes between its rows.
#[cfg(target_arch = "x86_64")]
unsafe fn store_tile(which: usize, dst: *mut i32, stride: usize) {
    unsafe {
        match which {
            0 => {
                asm!("tilestored [{d} + {s}*1], tmm0", d = in(reg) dst, s = in(reg) stride, options(nostack))
            }
            1 => {
                asm!("tilestored [{d} + {s}*1], tmm1", d = in(reg) dst, s = in(reg) stride, options(nostack))
            }
            2 => {
                asm!("tilestored [{d} + {s}*1], tmm2", d = in(reg) dst, s = in(reg) stride, options(nostack))
            }
            _ => {
                asm!("tilestored [{d} + {s}*1], tmm3", d = in(reg) dst, s = in(reg) stride, options(nostack))
            }
        }
    }
}

/// Unpacks rows `r..r+16` into tiles in VNNI order: for 64-code chunk `c`, tile row `k4`
/// holds, for each of the 16 rows, codes `4·k4..4·k4+3` of the chunk.
///
/// In I2_S, byte `j` of a 128-code block holds codes `j`, `32+j`, `64+j`, `96+j` at bits
/// 7..6, 5..4, 3..2, 1..0, so the 32-bit word `m` of a block holds codes `32g+4m .. 32g+4m+3`
/// of group `g` at bit `6−2g` of each byte: a gather of word `m` from the 16 rows, shifted
/// and masked, is one tile row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn unpack_rows(a: &RowsArgs, r: usize, out: &mut [u8]) {
    use std::arch::x86_64::*;
    unsafe {
        let offsets = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(a.row_bytes as i32),
        );
        let mask = _mm512_set1_epi32(0x0303_0303);
        let base = a.w.add(r * a.row_bytes);
        for b in 0..a.k / 128 {
            let block = base.add(32 * b);
            for m in 0..8 {
                let words = _mm512_i32gather_epi32::<1>(offsets, block.add(4 * m) as *const i32);
                for g in 0..4 {
                    // Group g: codes 32g + 4m.. of the block, in chunk 2b + g/2, tile row
                    // 8·(g%2) + m.
                    // Bits 6−2g..7−2g of each byte stay within the byte after the shift.
                    let shifted = _mm512_srlv_epi32(words, _mm512_set1_epi32(6 - 2 * g as i32));
                    let codes = _mm512_and_si512(shifted, mask);
                    let chunk = 2 * b + g / 2;
                    let row = 8 * (g % 2) + m;
                    _mm512_storeu_si512(
                        out.as_mut_ptr().add(chunk * 1024 + row * 64) as *mut __m512i,
                        codes,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ternary::rows_scalar;
    use crate::ternary::test_data::{random_q, random_rows, run};

    #[test]
    fn amx_equals_the_scalar_reference() {
        if !available() {
            eprintln!("SKIPPING: no AMX-INT8 on this host");
            return;
        }
        for (rows, k, tokens) in [
            (16, 128, 16),
            (48, 256, 5),
            (37, 2560, 40),
            (64, 6912, 33),
            (32, 128, 1),
        ] {
            let w = random_rows(rows, k, 5 + k as u64);
            let mut q = random_q(k * tokens, rows as u64);
            q[0] = -128;
            assert_eq!(
                run(rows_amx, &w, rows, k, &q, tokens),
                run(rows_scalar, &w, rows, k, &q, tokens),
                "{rows}x{k}x{tokens}"
            );
        }
    }
}
