package outputs

import (
	"context"
	"fmt"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// BenchmarkCollect collects an output directory of 1000 small files and a
// single 64 MiB file into an empty memory CAS ("upload") and into one
// that has every blob already ("present", the cost of hashing and one
// FindMissing).
func BenchmarkCollect(b *testing.B) {
	for _, tc := range []struct {
		name  string
		out   string
		setup func(b *testing.B, root string) int64
	}{
		{"dir-1000-small-files", "out", func(b *testing.B, root string) int64 {
			var total int64
			for i := range 1000 {
				data := pattern(1000+i, byte(i))
				writeFile(b, root, fmt.Sprintf("out/d%02d/f%04d", i%20, i), data, 0o644)
				total += int64(len(data))
			}
			return total
		}},
		{"file-64MiB", "big", func(b *testing.B, root string) int64 {
			writeFile(b, root, "big", pattern(64<<20, 3), 0o644)
			return 64 << 20
		}},
	} {
		for _, fn := range functions {
			for _, present := range []bool{false, true} {
				mode := "upload"
				if present {
					mode = "present"
				}
				b.Run(fmt.Sprintf("%s/%s/%s", tc.name, fn, mode), func(b *testing.B) {
					root := b.TempDir()
					size := tc.setup(b, root)
					// Start from a warm page cache, as after a build.
					unix.Sync()
					cmd := &repb.Command{OutputPaths: []string{tc.out}}
					ctx := context.Background()
					cas := blobstore.NewMemory(blobstore.CAS, 1<<30)
					if present {
						if _, err := Collect(ctx, cas, fn, root, cmd, Options{}); err != nil {
							b.Fatal(err)
						}
					}
					b.SetBytes(size)
					b.ResetTimer()
					for b.Loop() {
						if !present {
							b.StopTimer()
							cas = blobstore.NewMemory(blobstore.CAS, 1<<30)
							b.StartTimer()
						}
						res, err := Collect(ctx, cas, fn, root, cmd, Options{})
						if err != nil {
							b.Fatal(err)
						}
						if present && res.Stats.UploadedBlobs != 0 {
							b.Fatalf("uploaded %d blobs", res.Stats.UploadedBlobs)
						}
					}
				})
			}
		}
	}
}

// BenchmarkUploadFile uploads a 64 MiB file to an empty memory CAS.
func BenchmarkUploadFile(b *testing.B) {
	root := b.TempDir()
	writeFile(b, root, "stdout", pattern(64<<20, 5), 0o644)
	b.SetBytes(64 << 20)
	for b.Loop() {
		b.StopTimer()
		cas := blobstore.NewMemory(blobstore.CAS, 1<<30)
		b.StartTimer()
		if _, err := UploadFile(context.Background(), cas, digest.SHA256, root+"/stdout"); err != nil {
			b.Fatal(err)
		}
	}
}
