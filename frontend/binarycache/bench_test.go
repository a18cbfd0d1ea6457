package binarycache_test

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"tvixfarm/cas/blobstore"
	"tvixfarm/frontend/binarycache"
	"tvixfarm/frontend/pathinfo"
)

// BenchmarkNarInfo serves one narinfo (handler only, no network), with and
// without signing it.
func BenchmarkNarInfo(b *testing.B) {
	f := newFixture(b, 0)
	req := httptest.NewRequest("GET", "/"+pathinfo.HashPart(testPath)+".narinfo", nil)
	for _, signed := range []bool{false, true} {
		var key *signature.SecretKey
		if signed {
			key = &f.key
		}
		h := binarycache.New(f.paths, f.cas, binarycache.Options{Key: key})
		b.Run(fmt.Sprintf("signed=%v", signed), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, req)
				if rec.Code != 200 {
					b.Fatal(rec.Code)
				}
			}
		})
	}
}

// BenchmarkNar downloads NARs over loopback HTTP from a memory CAS: 1,000
// small files (100 B to 4 KB, 2 MB in 10 directories) and one 100 MB file.
func BenchmarkNar(b *testing.B) {
	trees := map[string]func(dir string){
		"small-files-1000": func(dir string) {
			for i := range 1000 {
				sub := filepath.Join(dir, fmt.Sprintf("d%d", i%10))
				os.MkdirAll(sub, 0o755)
				data := make([]byte, 100+(i*3907)%3900)
				for j := range data {
					data[j] = byte(i + j)
				}
				if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%04d", i)), data, 0o644); err != nil {
					b.Fatal(err)
				}
			}
		},
		"file-100MB": func(dir string) {
			os.MkdirAll(dir, 0o755)
			data := make([]byte, 100<<20)
			for j := range data {
				data[j] = byte(j * 31 / 7)
			}
			if err := os.WriteFile(filepath.Join(dir, "big"), data, 0o644); err != nil {
				b.Fatal(err)
			}
		},
	}
	for _, name := range []string{"small-files-1000", "file-100MB"} {
		b.Run(name, func(b *testing.B) {
			dir := filepath.Join(b.TempDir(), name)
			trees[name](dir)
			cas := blobstore.NewMemory(blobstore.CAS, 1<<40)
			paths := pathinfo.NewBlobStore(blobstore.NewMemory(blobstore.AC, 1<<20), nil)
			info, _ := register(b, cas, paths, dir, testPath, nil, nil)
			os.RemoveAll(dir)
			srv := httptest.NewServer(binarycache.New(paths, cas, binarycache.Options{}))
			defer srv.Close()
			url := srv.URL + "/" + binarycache.NarURL(info)
			b.SetBytes(int64(info.NarSize))
			for b.Loop() {
				resp, err := http.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				n, err := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil || n != int64(info.NarSize) {
					b.Fatalf("%d of %d bytes: %v", n, info.NarSize, err)
				}
			}
		})
	}
}
