//! Host work split across the cores: drawing random tensors, encoding them
//! for upload, drawing a step's tokens. The split never changes a result.

/// How many parts to split `items` into: one per core, each at least `min`
/// items (one part when there are fewer).
pub(crate) fn parts(items: usize, min: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    cores.min(items / min.max(1)).max(1)
}

/// Calls `fill(first, part)` on consecutive parts of `out`, which holds
/// `unit` elements per item: `first` is the part's first item. Split
/// across the cores (see [`parts`]) when there are enough items.
pub(crate) fn fill_parts<T: Send>(out: &mut [T], unit: usize, min: usize, fill: impl Fn(usize, &mut [T]) + Sync) {
    let items = out.len() / unit.max(1);
    let n = parts(items, min);
    if n == 1 {
        fill(0, out);
        return;
    }
    let per = items.div_ceil(n);
    let fill = &fill;
    std::thread::scope(|scope| {
        for (i, part) in out.chunks_mut(per * unit).enumerate() {
            scope.spawn(move || fill(i * per, part));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_every_item_once() {
        for (len, unit) in [(0, 1), (7, 1), (1 << 12, 1), (3 * 1000 + 5, 1), (4 * 999, 4)] {
            let mut out = vec![usize::MAX; len];
            fill_parts(&mut out, unit, 100, |first, part| {
                for (k, v) in part.iter_mut().enumerate() {
                    *v = first * unit + k;
                }
            });
            assert!(out.iter().enumerate().all(|(i, &v)| v == i), "len {len}, unit {unit}");
        }
        assert_eq!(parts(10, 100), 1);
        assert!(parts(1 << 20, 1) >= 1);
    }
}
