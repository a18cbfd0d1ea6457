package grpcservers_test

// These tests drive the server with a real REAPI client library, the
// remote-apis-sdks Go client. It supports only SHA-256 (its digest package
// has a crypto.Hash, which has no BLAKE3), so the BLAKE3 paths are covered
// by the raw gRPC tests only.

import (
	"bytes"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/client"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/command"
	sdkdigest "github.com/bazelbuild/remote-apis-sdks/go/pkg/digest"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/filemetadata"
	"github.com/bazelbuild/remote-apis-sdks/go/pkg/uploadinfo"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"
)

func TestMain(m *testing.M) {
	flag.Parse()
	// The remote-apis-sdks client logs through glog, which writes files
	// (to /tmp by default): keep them in a directory of our own.
	dir, err := os.MkdirTemp("", "glog-")
	if err == nil {
		if f := flag.Lookup("log_dir"); f != nil {
			f.Value.Set(dir)
		}
	}
	code := m.Run()
	if dir != "" {
		os.RemoveAll(dir)
	}
	os.Exit(code)
}

func newSDKClient(t *testing.T, e *env, instance string, opts ...client.Opt) *client.Client {
	t.Helper()
	ctx := testCtx(t)
	c, err := client.NewClient(ctx, instance, client.DialParams{
		Service:               e.addr,
		NoSecurity:            true,
		MaxConcurrentRequests: 4,
	}, append([]client.Opt{client.UseBatchOps(true), client.RetryTransient()}, opts...)...)
	if err != nil {
		t.Fatalf("client.NewClient: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// writeTree creates files under dir from a map of relative path to
// contents; paths ending in "*" are executable, paths ending in "/" are
// empty directories.
func writeTree(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	for name, data := range files {
		mode := os.FileMode(0o644)
		if name[len(name)-1] == '/' {
			if err := os.MkdirAll(filepath.Join(dir, name), 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if name[len(name)-1] == '*' {
			name, mode = name[:len(name)-1], 0o755
		}
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
	}
}

type fileInfo struct {
	data []byte
	exec bool
	dir  bool
}

func readTree(t *testing.T, dir string) map[string]fileInfo {
	t.Helper()
	out := map[string]fileInfo{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == "." {
			return nil
		}
		if d.IsDir() {
			out[rel] = fileInfo{dir: true}
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		out[rel] = fileInfo{data: data, exec: info.Mode()&0o100 != 0}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func compareTrees(t *testing.T, got, want map[string]fileInfo) {
	t.Helper()
	for name, w := range want {
		g, ok := got[name]
		switch {
		case !ok:
			t.Errorf("%s: missing from the download", name)
		case g.dir != w.dir:
			t.Errorf("%s: directory %v, want %v", name, g.dir, w.dir)
		case !bytes.Equal(g.data, w.data):
			t.Errorf("%s: %d bytes differ from the %d uploaded", name, len(g.data), len(w.data))
		case g.exec != w.exec:
			t.Errorf("%s: executable %v, want %v", name, g.exec, w.exec)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("%s: downloaded but not uploaded", name)
		}
	}
}

func TestSDKClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, mode := range []struct {
		name     string
		instance string
		opts     []client.Opt
	}{
		{"plain", "", nil},
		// Compress every ByteStream transfer and batch (zstd), in an
		// instance with a slash.
		{"zstd", "sdk/inst", []client.Opt{client.CompressedBytestreamThreshold(0)}},
		// The SDK's background upload and download daemons.
		{"unified", "unified", []client.Opt{client.UnifiedUploads(true), client.UnifiedDownloads(true)}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			ctx := testCtx(t)
			c := newSDKClient(t, e, mode.instance, mode.opts...)
			salt := []byte(mode.name)

			src := t.TempDir()
			writeTree(t, src, map[string][]byte{
				"README":                          append([]byte("hello from the sdk test "), salt...),
				"empty":                           nil,
				"bin/tool*":                       append([]byte("#!/bin/sh\necho tool "), salt...),
				"lib/data.bin":                    randBytes(uint64(len(salt))+1, 100<<10),
				"lib/big.bin":                     randBytes(uint64(len(salt))+2, 4<<20+123),
				"lib/text.txt":                    textBytes(uint64(len(salt))+3, 1<<20),
				"deep/er/and/deeper/leaf.txt":     append([]byte("leaf "), salt...),
				"deep/er/and/deeper/leaf-exec.sh": []byte("second leaf"),
				"deep/er/sibling/x":               []byte("x"),
				"deep/er/sibling/dup":             []byte("x"),
				"emptydir/":                       nil,
			})
			want := readTree(t, src)

			root, entries, _, err := c.ComputeMerkleTree(ctx, src, "", "", &command.InputSpec{Inputs: []string{"."}}, filemetadata.NewNoopCache())
			if err != nil {
				t.Fatalf("ComputeMerkleTree: %v", err)
			}
			missing, moved, err := c.UploadIfMissing(ctx, entries...)
			if err != nil {
				t.Fatalf("UploadIfMissing: %v", err)
			}
			if len(missing) == 0 || moved == 0 {
				t.Fatalf("UploadIfMissing uploaded nothing (%d missing, %d bytes)", len(missing), moved)
			}
			missing, _, err = c.UploadIfMissing(ctx, entries...)
			if err != nil || len(missing) != 0 {
				t.Fatalf("second UploadIfMissing: %d missing, %v", len(missing), err)
			}
			var ds []sdkdigest.Digest
			for _, ue := range entries {
				ds = append(ds, ue.Digest)
			}
			if m, err := c.MissingBlobs(ctx, ds); err != nil || len(m) != 0 {
				t.Fatalf("MissingBlobs after upload: %v, %v", m, err)
			}

			dst := t.TempDir()
			if _, _, err := c.DownloadDirectory(ctx, root, dst, filemetadata.NewNoopCache()); err != nil {
				t.Fatalf("DownloadDirectory: %v", err)
			}
			compareTrees(t, readTree(t, dst), want)

			// Single blobs, small and large.
			for i, blob := range [][]byte{append([]byte("a blob "), salt...), randBytes(uint64(len(salt))+4, 4<<20+1000), {}} {
				d, err := c.WriteBlob(ctx, blob)
				if err != nil {
					t.Fatalf("WriteBlob %d: %v", i, err)
				}
				got, _, err := c.ReadBlob(ctx, d)
				if err != nil || !bytes.Equal(got, blob) {
					t.Fatalf("ReadBlob %d: %d bytes, %v", i, len(got), err)
				}
				if len(blob) > 100 {
					// With compression on, the SDK reads compressed-blobs
					// from an offset in the uncompressed data.
					got, _, err = c.ReadBlobRange(ctx, d, 10, 0)
					if err != nil || !bytes.Equal(got, blob[10:]) {
						t.Fatalf("ReadBlobRange(%d, offset 10): %d bytes, %v", i, len(got), err)
					}
					// REAPI forbids read_limit on compressed reads.
					if mode.name != "zstd" {
						got, _, err = c.ReadBlobRange(ctx, d, 10, 50)
						if err != nil || !bytes.Equal(got, blob[10:60]) {
							t.Fatalf("ReadBlobRange(%d, offset 10, limit 50): %d bytes, %v", i, len(got), err)
						}
					}
				}
			}
			batch := map[sdkdigest.Digest][]byte{}
			for i := range 20 {
				b := []byte(fmt.Sprintf("batch blob %d %s", i, salt))
				batch[sdkdigest.NewFromBlob(b)] = b
			}
			if err := c.BatchWriteBlobs(ctx, batch); err != nil {
				t.Fatalf("BatchWriteBlobs: %v", err)
			}
			var bds []sdkdigest.Digest
			for d := range batch {
				bds = append(bds, d)
			}
			got, err := c.BatchDownloadBlobs(ctx, bds)
			if err != nil {
				t.Fatalf("BatchDownloadBlobs: %v", err)
			}
			for d, b := range batch {
				if !bytes.Equal(got[d], b) {
					t.Fatalf("BatchDownloadBlobs: %v differs", d)
				}
			}

			// Action cache, with outputs computed and downloaded by the
			// SDK.
			outs, res, err := c.ComputeOutputsToUpload(src, "", []string{"README", "bin/tool", "lib", "deep"}, filemetadata.NewNoopCache(), command.UnspecifiedSymlinkBehavior, nil)
			if err != nil {
				t.Fatalf("ComputeOutputsToUpload: %v", err)
			}
			actionDigest, err := c.WriteProto(ctx, &repb.Action{CommandDigest: sdkdigest.NewFromBlob(salt).ToProto(), DoNotCache: false})
			if err != nil {
				t.Fatalf("WriteProto: %v", err)
			}
			// Make the tree blobs missing first: a result whose outputs are
			// not in the CAS is a miss. (Outputs of the merkle tree above
			// are already there; the Tree protos are new.)
			if _, err := c.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{InstanceName: c.InstanceName, ActionDigest: actionDigest.ToProto(), ActionResult: res}); err != nil {
				t.Fatalf("UpdateActionResult: %v", err)
			}
			if ar, err := c.CheckActionCache(ctx, actionDigest.ToProto()); err != nil || ar != nil {
				t.Fatalf("CheckActionCache with the output trees missing: %v, %v; want a miss", ar, err)
			}
			var toUpload []*uploadinfo.Entry
			for _, ue := range outs {
				toUpload = append(toUpload, ue)
			}
			if _, _, err := c.UploadIfMissing(ctx, toUpload...); err != nil {
				t.Fatalf("UploadIfMissing(outputs): %v", err)
			}
			ar, err := c.CheckActionCache(ctx, actionDigest.ToProto())
			if err != nil || ar == nil {
				t.Fatalf("CheckActionCache: %v, %v", ar, err)
			}
			if !proto.Equal(ar, res) {
				t.Fatalf("CheckActionCache = %v, want %v", ar, res)
			}
			outDir := t.TempDir()
			if _, err := c.DownloadActionOutputs(ctx, ar, outDir, filemetadata.NewNoopCache()); err != nil {
				t.Fatalf("DownloadActionOutputs: %v", err)
			}
			wantOuts := map[string]fileInfo{}
			for name, fi := range want {
				if name == "empty" || name == "emptydir" || name == "bin" {
					continue
				}
				wantOuts[name] = fi
			}
			gotOuts := readTree(t, outDir)
			delete(gotOuts, "bin")
			compareTrees(t, gotOuts, wantOuts)
		})
	}
}

// TestSDKGetDirectoryTree reads a tree of more than 4 MiB of directories
// with the SDK, which reads one GetTree stream.
func TestSDKGetDirectoryTree(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	fc := fnCases[0]
	c := newSDKClient(t, e, "")
	ctx := testCtx(t)
	long := string(bytes.Repeat([]byte("n"), 900))
	root := &repb.Directory{}
	var blobs [][]byte
	for i := range 50 {
		d := &repb.Directory{}
		for j := range 100 {
			d.Files = append(d.Files, &repb.FileNode{Name: fmt.Sprintf("%03d-%03d-%s", i, j, long), Digest: fc.pd(nil)})
		}
		data, err := proto.MarshalOptions{Deterministic: true}.Marshal(d)
		if err != nil {
			t.Fatal(err)
		}
		blobs = append(blobs, data)
		root.Directories = append(root.Directories, &repb.DirectoryNode{Name: fmt.Sprintf("d%03d", i), Digest: fc.pd(data)})
	}
	e.batchUpload(t, "", fc, blobs...)
	rootD := e.uploadProto(t, "", fc, root)
	dirs, err := c.GetDirectoryTree(ctx, rootD)
	if err != nil {
		t.Fatalf("GetDirectoryTree: %v", err)
	}
	if len(dirs) != 51 {
		t.Fatalf("GetDirectoryTree: %d directories, want 51", len(dirs))
	}
	for i, d := range dirs[1:] {
		if !proto.Equal(d, mustUnmarshalDir(t, blobs[i])) {
			t.Fatalf("GetDirectoryTree: directory %d differs", i+1)
		}
	}
}

func mustUnmarshalDir(t *testing.T, data []byte) *repb.Directory {
	t.Helper()
	d := &repb.Directory{}
	if err := proto.Unmarshal(data, d); err != nil {
		t.Fatal(err)
	}
	return d
}
