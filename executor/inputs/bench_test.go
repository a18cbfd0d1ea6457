package inputs

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"tvixfarm/cas/digest"
)

// BenchmarkMaterialize materialises input roots with a warm cache, the
// common case of consecutive actions sharing their inputs. Each iteration
// fills a new directory; removing them is not measured.
func BenchmarkMaterialize(b *testing.B) {
	b.Run("flat100x100", func(b *testing.B) {
		cas := newStore(b, digest.SHA256)
		var dirs []any
		for i := range 100 {
			var files []any
			for j := range 100 {
				files = append(files, file(fmt.Sprintf("file%03d.c", j), cas.blob(b, fmt.Sprintf("source %d/%d\n", i, j)), false))
			}
			dirs = append(dirs, subdir(fmt.Sprintf("dir%03d", i), cas.dir(b, files...)))
		}
		benchmarkMaterialize(b, cas, cas.dir(b, dirs...), nil)
	})
	// A Nix closure: 200 store paths of 10 files (and a symlink) each,
	// merged into the nix/store directory the sandbox has created.
	b.Run("closure200x10", func(b *testing.B) {
		cas := newStore(b, digest.BLAKE3)
		var paths []any
		for i := range 200 {
			blob := func(name string) digest.Digest {
				return cas.blob(b, fmt.Sprintf("%s of store path %d\n", name, i))
			}
			bin := cas.dir(b, file("prog", blob("prog"), true), file("helper", blob("helper"), true))
			lib := cas.dir(b,
				file("libfoo.so.1.0", blob("lib"), false),
				file("libfoo.a", blob("archive"), false),
				file("libfoo.la", blob("la"), false),
				symlink("libfoo.so", "libfoo.so.1.0"),
			)
			pc := cas.dir(b, file("foo.pc", blob("pc"), false))
			doc := cas.dir(b, file("README", blob("readme"), false), file("LICENSE", cas.blob(b, "MIT\n"), false))
			share := cas.dir(b, subdir("doc", doc), file("empty", digest.Empty(digest.BLAKE3), false))
			paths = append(paths, subdir(fmt.Sprintf("%032d-pkg-%d", i, i), cas.dir(b,
				subdir("bin", bin), subdir("lib", cas.dir(b, subdir("pkgconfig", pc))), subdir("lib64", lib), subdir("share", share))))
		}
		root := cas.dir(b, subdir("nix", cas.dir(b, subdir("store", cas.dir(b, paths...)))))
		benchmarkMaterialize(b, cas, root, []string{"nix/store", "build", "tmp"})
	})
}

func benchmarkMaterialize(b *testing.B, cas *store, root digest.Digest, mountpoints []string) {
	for _, p := range []int{1, 4} {
		b.Run(fmt.Sprintf("p%d", p), func(b *testing.B) {
			benchmarkMaterializeWith(b, cas, root, mountpoints, MaterializeOptions{Parallelism: p})
		})
	}
}

func benchmarkMaterializeWith(b *testing.B, cas *store, root digest.Digest, mountpoints []string, opts MaterializeOptions) {
	ctx := context.Background()
	c := newCache(b, 1<<30, cas)
	m := NewMaterializer(c, 64<<20)
	base := b.TempDir()
	n := 0
	run := func() MaterializeStats {
		n++
		dst := filepath.Join(base, fmt.Sprint(n))
		for _, mp := range append(mountpoints, "") {
			if err := os.MkdirAll(filepath.Join(dst, mp), 0o755); err != nil {
				b.Fatal(err)
			}
		}
		stats, err := m.Materialize(ctx, root, dst, opts)
		if err != nil {
			b.Fatal(err)
		}
		return stats
	}
	cold := run()
	var files int64
	for b.Loop() {
		stats := run()
		if stats.FilesFetched != 0 {
			b.Fatalf("warm run fetched %d files", stats.FilesFetched)
		}
		files += stats.Files
	}
	b.ReportMetric(float64(files)/b.Elapsed().Seconds(), "files/s")
	b.ReportMetric(float64(cold.Files), "files/op")
	b.ReportMetric(float64(cold.Directories), "dirs/op")
}
