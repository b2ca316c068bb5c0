//! The writer's own tests: tiling, blending, round trips read back by the engine's reader,
//! overwrite protection, free writes, downsampling, the coordinate frame.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::format::dtype::DType;
use crate::format::ngff::{CoordinateFrame, ZarrFormat};
use crate::geometry::WorldBox;
use crate::io::location::Location;
use crate::source::cache::ChunkCache;
use crate::source::volume::Volume;

static TEST_DIRS: AtomicU64 = AtomicU64::new(0);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "cellmap-writer-test-{}-{}-{name}",
        std::process::id(),
        TEST_DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(path: PathBuf, lo: [f64; 3], hi: [f64; 3], voxel: [f64; 3], tile: [usize; 3]) -> WriterConfig {
    WriterConfig {
        path: Location::Local(path),
        name: None,
        voxel_size: voxel,
        bounds: WorldBox { lo, hi },
        write_shape: tile,
        chunk_shape: tile,
        dtype: DType::F32,
        fill_value: 0.0,
        format: ZarrFormat::V2,
        overwrite: false,
        exist_ok: false,
        first_level: 0,
        downsample_levels: 0,
        compression_level: 3,
        tiling: Some(TilingConfig {
            overlap: [0; 3],
            blend: Blend::Linear,
        }),
        protected: Vec::new(),
        fsync: false,
        frame: CoordinateFrame::Corner,
        shard: None,
        downsample: crate::writer::Downsample::Mean,
    }
}

/// f(world centre of the voxel)
fn field(w: [f64; 3]) -> f32 {
    (w[0] * 0.5 + w[1] * 0.25 - w[2] * 0.125) as f32
}

fn tile_values(writer: &ImageWriter, index: usize) -> Vec<f32> {
    let plan = writer.plan().unwrap();
    let s = plan.tile_start(index);
    let t = plan.tile;
    let c = writer.config();
    let mut out = Vec::with_capacity(t.iter().product());
    for z in 0..t[0] {
        for y in 0..t[1] {
            for x in 0..t[2] {
                let v = [z, y, x];
                out.push(field(std::array::from_fn(|k| {
                    c.bounds.lo[k] + ((s[k] + v[k] as i64) as f64 + 0.5) * c.voxel_size[k]
                })));
            }
        }
    }
    out
}

#[test]
fn linear_weights_are_a_partition_of_unity_in_the_overlap() {
    let (n, o) = (32usize, 8usize);
    let w = Blend::Linear.axis_weights(n, o);
    for i in 0..o {
        // tile A's voxel n-o+i overlaps tile B's voxel i
        assert!((w[n - o + i] + w[i] - 1.0).abs() < 1e-6);
    }
    assert!(w.iter().all(|&v| v > 0.0 && v <= 1.0));
    let g = Blend::Gaussian.axis_weights(n, o);
    assert!(g.iter().all(|&v| v > 0.0));
    assert!(g[n / 2] > g[0]);
}

#[test]
fn plain_regions_partition_the_axis() {
    let plan = TilePlan::new([1, 10, 1000], [1, 4, 128], [0; 3], Blend::Linear);
    for k in 0..3 {
        let mut next = 0;
        for &(lo, hi) in &plan.regions[k] {
            assert_eq!(lo, next);
            next = hi;
        }
        assert_eq!(next, [1, 10, 1000][k]);
    }
}

#[test]
fn round_trip_exact_and_readable_by_the_engine() {
    let dir = temp_dir("roundtrip");
    let path = dir.join("out.zarr").join("pred").join("mito");
    // 37 x 70 x 45 voxels of (4, 4, 8) nm, not multiples of the (16, 32, 32) tile
    let lo = [100.0, -40.0, 8.0];
    let voxel = [4.0, 4.0, 8.0];
    let hi = [lo[0] + 37.0 * 4.0, lo[1] + 70.0 * 4.0, lo[2] + 45.0 * 8.0];
    let writer = ImageWriter::create(config(path.clone(), lo, hi, voxel, [16, 32, 32])).unwrap();
    assert_eq!(writer.shape(), [37, 70, 45]);
    let n = writer.plan().unwrap().len();
    // arrive in reverse, two at a time
    let order: Vec<usize> = (0..n).rev().collect();
    for pair in order.chunks(2) {
        let data: Vec<f32> = pair.iter().flat_map(|&i| tile_values(&writer, i)).collect();
        writer.write_tiles(pair, &data).unwrap();
    }
    assert_eq!(writer.stats().pending_chunks, 0, "every chunk completes without flush");
    writer.close().unwrap();
    assert!(path.parent().unwrap().join(".zgroup").is_file());
    assert!(dir.join("out.zarr").join(".zgroup").is_file());

    let volume = Volume::open(&path, ChunkCache::global()).unwrap();
    let level = &volume.levels[0];
    assert_eq!(level.shape, [37, 70, 45]);
    let b = level.world_box();
    for k in 0..3 {
        assert!((b.lo[k] - lo[k]).abs() < 1e-9 && (b.hi[k] - hi[k]).abs() < 1e-9);
    }
    let mut out = vec![0f32; 37 * 70 * 45];
    volume
        .gather(
            0,
            [0, 0, 0],
            [37, 70, 45],
            &mut out,
            0,
            [70 * 45, 45, 1],
            crate::source::volume::ValueMode::Raw,
            f32::NAN,
        )
        .unwrap();
    for z in 0..37 {
        for y in 0..70 {
            for x in 0..45 {
                let v = [z, y, x];
                let w = std::array::from_fn(|k| level.translation[k] + v[k] as f64 * level.voxel_size[k]);
                assert_eq!(out[(z * 70 + y) * 45 + x], field(w), "voxel {v:?}");
            }
        }
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn blended_constant_is_exact_and_pending_is_bounded() {
    let dir = temp_dir("blend");
    let path = dir.join("b.zarr").join("c");
    let mut c = config(path.clone(), [0.0; 3], [8.0, 200.0, 200.0], [8.0, 2.0, 2.0], [1, 32, 32]);
    c.tiling = Some(TilingConfig {
        overlap: [0, 8, 8],
        blend: Blend::Gaussian,
    });
    c.format = ZarrFormat::V3;
    let writer = ImageWriter::create(c).unwrap();
    let n = writer.plan().unwrap().len();
    for i in 0..n {
        writer.write_tiles(&[i], &vec![2.5f32; 32 * 32]).unwrap();
    }
    assert_eq!(writer.stats().pending_chunks, 0);
    let back = writer.read_box([0, 0, 0], [1, 100, 100]).unwrap();
    assert!(back.iter().all(|&v| (v - 2.5).abs() < 1e-5), "{:?}", &back[..4]);
    writer.close().unwrap();
    assert!(path.join("zarr.json").is_file());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn existing_output_needs_overwrite_and_input_is_protected() {
    let dir = temp_dir("exists");
    let path = dir.join("o.zarr").join("x");
    let c = config(path.clone(), [0.0; 3], [4.0; 3], [1.0; 3], [4, 4, 4]);
    ImageWriter::create(c.clone()).unwrap().close().unwrap();
    let e = ImageWriter::create(c.clone()).unwrap_err();
    assert!(
        matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{e}"
    );
    assert!(e.to_string().contains("overwrite"));
    let mut o = c.clone();
    o.overwrite = true;
    ImageWriter::create(o).unwrap();
    let mut p = c;
    p.overwrite = true;
    p.protected = vec![Location::Local(dir.join("o.zarr"))];
    let e = ImageWriter::create(p).unwrap_err();
    assert!(e.to_string().contains("input data"), "{e}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn free_writes_complete_by_coverage_and_rewrite_after_flush() {
    let dir = temp_dir("free");
    let path = dir.join("f.zarr").join("x");
    let mut c = config(path.clone(), [0.0; 3], [4.0, 8.0, 8.0], [1.0; 3], [4, 4, 4]);
    c.tiling = None;
    let writer = ImageWriter::create(c).unwrap();
    writer.write_boxes(&[[0, 0, 0]], &vec![1.0; 64]).unwrap();
    // Complete: written now, or held for the next group of complete chunks.
    let s = writer.stats();
    assert_eq!((s.pending_chunks, s.complete_chunks + s.chunks_written), (0, 1), "{s:?}");
    writer.flush().unwrap();
    assert_eq!(writer.stats().chunks_written, 1);
    writer.write_boxes(&[[0, 2, 2]], &vec![3.0; 64]).unwrap();
    let back = writer.read_box([0, 0, 0], [1, 8, 8]).unwrap();
    assert_eq!(back[0], 1.0);
    assert_eq!(back[2 * 8 + 2], 3.0);
    assert_eq!(back[5 * 8 + 5], 3.0);
    assert_eq!(back[7 * 8 + 7], 0.0);
    writer.close().unwrap();
    assert!(writer.write_boxes(&[[0, 0, 0]], &vec![1.0; 64]).is_err());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn downsampled_level_is_the_block_mean() {
    let dir = temp_dir("down");
    let path = dir.join("d.zarr").join("x");
    let mut c = config(path.clone(), [0.0; 3], [4.0, 8.0, 8.0], [1.0; 3], [4, 8, 8]);
    c.downsample_levels = 1;
    let writer = ImageWriter::create(c).unwrap();
    let data: Vec<f32> = (0..256).map(|i| i as f32).collect();
    writer.write_tiles(&[0], &data).unwrap();
    writer.close().unwrap();
    let volume = Volume::open(&path, ChunkCache::global()).unwrap();
    assert_eq!(volume.levels.len(), 2);
    assert_eq!(volume.levels[1].shape, [2, 4, 4]);
    assert_eq!(volume.levels[1].voxel_size, [2.0; 3]);
    assert_eq!(volume.levels[1].translation, [1.0; 3]);
    let mut out = vec![0f32; 32];
    volume
        .gather(
            1,
            [0, 0, 0],
            [2, 4, 4],
            &mut out,
            0,
            [16, 4, 1],
            crate::source::volume::ValueMode::Raw,
            0.0,
        )
        .unwrap();
    // block (0,0,0): z 0-1, y 0-1, x 0-1 of i = z*64 + y*8 + x
    let expect = [0, 1, 8, 9, 64, 65, 72, 73].iter().sum::<i32>() as f32 / 8.0;
    assert_eq!(out[0], expect);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn written_translation_follows_the_coordinate_frame() {
    let dir = temp_dir("frame");
    for (frame, written) in [
        (CoordinateFrame::Corner, [8.0, -4.0, 2.0]),
        (CoordinateFrame::Centre, [10.0, -2.0, 4.0]),
    ] {
        let path = dir.join(format!("{}.zarr", frame.name())).join("x");
        let mut c = config(path.clone(), [8.0, -4.0, 2.0], [40.0, 28.0, 34.0], [4.0; 3], [8, 8, 8]);
        c.frame = frame;
        c.downsample_levels = 1;
        let writer = ImageWriter::create(c).unwrap();
        assert_eq!(writer.translation(), written);
        writer.close().unwrap();
        // Read back in the same frame, every level spans the bounds from `lo`.
        let volume = Volume::open_in_frame(&path, ChunkCache::global(), frame).unwrap();
        assert_eq!(volume.levels[0].origin, written);
        for level in &volume.levels {
            assert_eq!(
                level.world_box().lo,
                [8.0, -4.0, 2.0],
                "{} level {:?}",
                frame.name(),
                level.voxel_size
            );
        }
        assert_eq!(volume.levels[0].world_box().hi, [40.0, 28.0, 34.0]);
        // Read in the other frame, the box moves by half a voxel of the level.
        let other = if frame == CoordinateFrame::Corner {
            CoordinateFrame::Centre
        } else {
            CoordinateFrame::Corner
        };
        let shifted = Volume::open_in_frame(&path, ChunkCache::global(), other).unwrap();
        let sign = if frame == CoordinateFrame::Corner { -1.0 } else { 1.0 };
        assert_eq!(
            shifted.levels[0].world_box().lo,
            [8.0 + sign * 2.0, -4.0 + sign * 2.0, 2.0 + sign * 2.0]
        );
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shared_writers_merge_partly_written_chunks_and_refuse_another_layout() {
    let dir = temp_dir("shared");
    let path = dir.join("s.zarr").join("x");
    let mut c = config(path.clone(), [0.0; 3], [1.0, 8.0, 8.0], [1.0; 3], [1, 8, 8]);
    c.tiling = None;
    c.exist_ok = true;
    // Two writers of one image (as two processes would be), each writing half of its only chunk.
    let a = ImageWriter::create(c.clone()).unwrap();
    let b = ImageWriter::create(c.clone()).unwrap();
    a.write_boxes(&[[0, 0, -4]], &[1.0; 64]).unwrap(); // x 0..4
    b.write_boxes(&[[0, 0, 4]], &[2.0; 64]).unwrap(); // x 4..8
    a.close().unwrap();
    b.close().unwrap();
    let reader = ImageWriter::create(c.clone()).unwrap();
    let back = reader.read_box([0, 0, 0], [1, 8, 8]).unwrap();
    for y in 0..8 {
        for x in 0..8 {
            assert_eq!(back[y * 8 + x], if x < 4 { 1.0 } else { 2.0 }, "voxel y={y} x={x}");
        }
    }
    let mut other = c.clone();
    other.chunk_shape = [1, 4, 4];
    let e = ImageWriter::create(other).unwrap_err().to_string();
    assert!(e.contains("same layout") && e.contains("chunks"), "{e}");
    let mut both = c;
    both.overwrite = true;
    assert!(ImageWriter::create(both).unwrap_err().to_string().contains("exist_ok"));
    fs::remove_dir_all(&dir).unwrap();
}

/// Every level of the image at `path`, whole, as f32 (read by the engine's reader).
fn read_levels(path: &std::path::Path) -> Vec<Vec<f32>> {
    let volume = Volume::open(path, ChunkCache::global()).unwrap();
    volume
        .levels
        .iter()
        .enumerate()
        .map(|(i, level)| {
            let s = level.shape;
            let shape: [usize; 3] = std::array::from_fn(|k| s[k] as usize);
            let mut out = vec![0f32; shape.iter().product()];
            let strides = [(shape[1] * shape[2]) as isize, shape[2] as isize, 1];
            volume
                .gather(i, [0; 3], shape, &mut out, 0, strides, crate::source::volume::ValueMode::Raw, 0.0)
                .unwrap();
            out
        })
        .collect()
}

#[test]
fn ranks_build_the_second_level_over_their_own_chunks_and_rank_0_the_rest() {
    let dir = temp_dir("ranks-levels");
    // Uneven 5×7×9 chunks of 8³, blended tiles, two downsampled levels.
    let base = |path: PathBuf| {
        let mut c = config(path, [0.0; 3], [40.0, 56.0, 72.0], [1.0; 3], [8, 8, 8]);
        c.tiling = Some(TilingConfig {
            overlap: [2; 3],
            blend: Blend::Linear,
        });
        c.downsample_levels = 2;
        c
    };
    let one_path = dir.join("one.zarr").join("x");
    let one = ImageWriter::create(base(one_path.clone())).unwrap();
    for i in one.tiles_to_write().unwrap() {
        one.write_tiles(&[i], &tile_values(&one, i)).unwrap();
    }
    one.close().unwrap();

    let path = dir.join("ranks.zarr").join("x");
    let world = 3;
    let ranks: Vec<ImageWriter> = (0..world)
        .map(|rank| {
            let mut c = base(path.clone());
            c.exist_ok = true;
            c.shard = Some(Shard { rank, world_size: world });
            ImageWriter::create(c).unwrap()
        })
        .collect();
    for w in &ranks {
        for i in w.tiles_to_write().unwrap() {
            w.write_tiles(&[i], &tile_values(w, i)).unwrap();
        }
    }
    // Rank 0 builds its own share at once (after its flush), then must wait for the others.
    ranks[0].flush().unwrap();
    ranks[0].downsample_own_share().unwrap();
    let (built, total) = ranks[0].levels_done().unwrap().unwrap();
    assert!(built > 0 && built < total, "{built} of {total}");
    let e = ranks[0].close().unwrap_err().to_string();
    assert!(e.contains("chunks of s1; rank 0 finishes"), "{e}");
    ranks[2].close().unwrap();
    ranks[1].close().unwrap();
    // Each second-level chunk is built by the rank that wrote the chunks under it.
    let progress = ranks[0].progress.as_ref().unwrap();
    let (shared_built, shared) = ranks[0].shares_built().unwrap().unwrap();
    assert_eq!(shared_built, shared);
    // Rank 0 finishes: it builds the chunks over two ranks' chunks, one per cut at most.
    let mut c = base(path.clone());
    c.exist_ok = true;
    c.shard = Some(Shard {
        rank: 0,
        world_size: world,
    });
    ImageWriter::create(c).unwrap().close().unwrap();
    assert_eq!(ranks[0].levels_done().unwrap(), Some((total, total)));
    assert!(total - shared < world as u64, "{shared} of {total}");
    let builders = progress.level_builders("s1").unwrap();
    assert_eq!(builders.len() as u64, total);
    for (chunk, by) in builders {
        let mut owners: Vec<usize> = ranks[0].source_chunks(1, chunk).map(|c| progress.owner(c)).collect();
        owners.dedup();
        assert!(
            owners == [by] || (owners.len() > 1 && by == 0),
            "{chunk:?} over {owners:?} built by rank {by}"
        );
    }
    assert!((0..world).all(|r| progress.level_builders("s1").unwrap().values().any(|&b| b == r)));
    assert_eq!(read_levels(&path), read_levels(&one_path));
    fs::remove_dir_all(&dir).unwrap();
}
