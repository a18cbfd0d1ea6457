package blobstore_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/blobstore/blobstoretest"
	"tvixfarm/cas/digest"
)

// quiet discards the disk store's warnings about the corruption the tests
// inject on purpose.
var quiet = slog.New(slog.DiscardHandler)

// openDisk opens a disk store and closes it at the end of the test.
func openDisk(t testing.TB, kind blobstore.Kind, dir string, opts blobstore.DiskOptions) blobstore.BlobAccess {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = quiet
	}
	ba, err := blobstore.NewDisk(kind, dir, opts)
	if err != nil {
		t.Fatalf("NewDisk(%s): %v", dir, err)
	}
	t.Cleanup(func() { closeStore(ba) })
	return ba
}

// closeStore closes a store if it has a Close method.
func closeStore(ba blobstore.BlobAccess) error {
	if c, ok := ba.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

func mustClose(t testing.TB, ba blobstore.BlobAccess) {
	t.Helper()
	if _, ok := ba.(io.Closer); !ok {
		t.Fatalf("%T has no Close method", ba)
	}
	if err := closeStore(ba); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// blobPath is where the disk store keeps the blob d.
func blobPath(dir string, d digest.Digest) string {
	h := d.Hex()
	return filepath.Join(dir, d.Function().String(), h[:2], h+"-"+strconv.FormatInt(d.Size(), 10))
}

// blobFiles lists the files in the blob directories of a disk store.
func blobFiles(t testing.TB, dir string) []string {
	t.Helper()
	var files []string
	for _, fn := range digest.Functions {
		root := filepath.Join(dir, fn.String())
		err := filepath.WalkDir(root, func(p string, de fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !de.IsDir() {
				files = append(files, p)
			}
			return nil
		})
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
	}
	return files
}

// wantTmpEmpty checks that dir/tmp holds no leftovers.
func wantTmpEmpty(t testing.TB, dir string) {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, "tmp"))
	if err != nil {
		t.Fatalf("read tmp dir: %v", err)
	}
	if len(ents) != 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("%s/tmp holds leftovers: %v", dir, names)
	}
}

func wantNoFile(t testing.TB, path string) {
	t.Helper()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("%s still exists (Lstat: %v)", path, err)
	}
}

func TestDiskConformance(t *testing.T) {
	// The conformance runs are independent of each other and bound by the
	// file system more than the CPU; timing-sensitive tests are not parallel.
	t.Parallel()
	both := []blobstore.Kind{blobstore.CAS, blobstore.AC}
	cas := []blobstore.Kind{blobstore.CAS}
	for _, cfg := range []struct {
		name  string
		kinds []blobstore.Kind
		opts  blobstore.DiskOptions
	}{
		{"default", both, blobstore.DiskOptions{MaxSize: 1 << 30}},
		// Verification and packing apply to the CAS only.
		{"verify", cas, blobstore.DiskOptions{MaxSize: 1 << 30, VerifyBelow: 1 << 20, VerifySampleRate: 1}},
		{"fsync", both, blobstore.DiskOptions{MaxSize: 1 << 30, Fsync: true, VerifySampleRate: 0.5, PackBelow: 4096}},
		// Blobs up to 1 MiB + 1 byte in pack files of 4 MiB: several packs,
		// so that reads of old records refresh them.
		{"packed", cas, blobstore.DiskOptions{MaxSize: 1 << 30, PackBelow: 1<<20 + 2, PackSize: 4 << 20}},
		// O_DIRECT for blobs of 1 MiB and more, sampled read verification.
		{"direct", cas, blobstore.DiskOptions{MaxSize: 1 << 30, DirectIO: true, PackBelow: 64 << 10, VerifySampleRate: 0.5}},
	} {
		t.Run(cfg.name, func(t *testing.T) {
			// The configurations are independent stores; the file system,
			// not the CPU, is the bottleneck.
			t.Parallel()
			for _, kind := range cfg.kinds {
				t.Run(kind.String(), func(t *testing.T) {
					blobstoretest.RunConformance(t, kind, func(t *testing.T) blobstore.BlobAccess {
						dir := t.TempDir()
						ba := openDisk(t, kind, dir, cfg.opts)
						t.Cleanup(func() {
							// Failed and successful Puts alike leave nothing behind in tmp.
							if !t.Failed() {
								wantTmpEmpty(t, dir)
							}
						})
						return ba
					})
				})
			}
		})
	}
}

func TestDiskLRU(t *testing.T) {
	testLRU(t, func(t *testing.T, max int64) blobstore.BlobAccess {
		return openDisk(t, blobstore.CAS, t.TempDir(), blobstore.DiskOptions{MaxSize: max})
	})
}

func TestDiskEvictionRemovesFiles(t *testing.T) {
	rng := blobstoretest.Rand(t)
	dir := t.TempDir()
	ba := openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 10000})
	var all []blobstoretest.Blob
	for i := 0; i < 100; i++ {
		b := blobstoretest.RandomBlob(rng, digest.Functions[i%2], 100+rng.IntN(1500))
		blobstoretest.MustPut(t, ba, b.Digest, b.Data)
		all = append(all, b)
	}
	total, present := storedBytes(t, ba, all)
	if total > 10000 {
		t.Fatalf("%d bytes indexed, max 10000", total)
	}
	if len(present) < 5 {
		t.Fatalf("only %d blobs survived", len(present))
	}
	files := blobFiles(t, dir)
	if len(files) != len(present) {
		t.Fatalf("%d files on disk for %d indexed blobs", len(files), len(present))
	}
	var onDisk int64
	for _, b := range all {
		_, err := os.Stat(blobPath(dir, b.Digest))
		if present[b.Digest] != (err == nil) {
			t.Errorf("blob %s: indexed %v, file stat error %v", b.Digest.Sprint(), present[b.Digest], err)
		}
		if err == nil {
			onDisk += b.Digest.Size()
		}
	}
	if onDisk > 10000 {
		t.Errorf("%d bytes on disk, max 10000", onDisk)
	}
	wantTmpEmpty(t, dir)
}

func TestDiskReopen(t *testing.T) {
	rng := blobstoretest.Rand(t)
	dir := t.TempDir()
	acDir := t.TempDir()
	opts := blobstore.DiskOptions{MaxSize: 1 << 30, VerifyBelow: 1 << 30}
	ba := openDisk(t, blobstore.CAS, dir, opts)
	ac := openDisk(t, blobstore.AC, acDir, opts)
	var blobs []blobstoretest.Blob
	for i, n := range []int{0, 1, 100, 70000, 2 << 20} {
		b := blobstoretest.RandomBlob(rng, digest.Functions[i%2], n)
		blobstoretest.MustPut(t, ba, b.Digest, b.Data)
		blobs = append(blobs, b)
	}
	action := blobstoretest.RandomBlob(rng, digest.SHA256, 123).Digest
	blobstoretest.MustPut(t, ac, action, []byte("first value"))
	value := blobstoretest.RandomBytes(rng, 5000) // not action.Size() bytes
	blobstoretest.MustPut(t, ac, action, value)
	mustClose(t, ba)
	mustClose(t, ac)

	ba = openDisk(t, blobstore.CAS, dir, opts)
	ac = openDisk(t, blobstore.AC, acDir, opts)
	for _, b := range blobs {
		blobstoretest.WantBlob(t, ba, b.Digest, b.Data)
	}
	blobstoretest.WantBlob(t, ac, action, value)
	extra := blobstoretest.RandomBlob(rng, digest.BLAKE3, 999)
	blobstoretest.MustPut(t, ba, extra.Digest, extra.Data)
	blobstoretest.WantBlob(t, ba, extra.Digest, extra.Data)
	mustClose(t, ba)

	// Reopening with a smaller maximum evicts the least recently written
	// blobs (by modification time) down to the new bound.
	all := append(blobs, extra)
	base := time.Now().Add(-time.Hour)
	for i, b := range all {
		mt := base.Add(time.Duration(i) * time.Minute)
		if err := os.Chtimes(blobPath(dir, b.Digest), mt, mt); err != nil {
			t.Fatal(err)
		}
	}
	ba = openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 100000})
	// Eviction at open drops the oldest blobs until the rest fits: here
	// everything but the newest blob, because the second newest is 2 MiB.
	total, present := storedBytes(t, ba, all)
	if total > 100000 {
		t.Fatalf("%d bytes kept, max 100000", total)
	}
	if !present[extra.Digest] {
		t.Fatal("the newest blob was evicted at open")
	}
	for _, b := range all {
		if !present[b.Digest] {
			wantNoFile(t, blobPath(dir, b.Digest))
		}
	}
}

// TestDiskShardsOnDemand: a fresh store has no shard directories; the first
// file of a shard creates it, and a reopened store finds the file.
func TestDiskShardsOnDemand(t *testing.T) {
	rng := blobstoretest.Rand(t)
	dir := t.TempDir()
	opts := blobstore.DiskOptions{MaxSize: 1 << 30, PackBelow: 64 << 10, Fsync: true}
	ba := openDisk(t, blobstore.CAS, dir, opts)
	for _, fn := range digest.Functions {
		if ents, _ := os.ReadDir(filepath.Join(dir, fn.String())); len(ents) != 0 {
			t.Fatalf("fresh store: %d entries in %s, want none", len(ents), fn)
		}
	}
	small := blobstoretest.RandomBlob(rng, digest.BLAKE3, 100)
	large := blobstoretest.RandomBlob(rng, digest.BLAKE3, 70000)
	blobstoretest.MustPut(t, ba, small.Digest, small.Data)
	blobstoretest.MustPut(t, ba, large.Digest, large.Data)
	ents, err := os.ReadDir(filepath.Join(dir, "blake3"))
	if err != nil || len(ents) != 1 || ents[0].Name() != large.Digest.Hex()[:2] {
		t.Fatalf("after a packed and a file blob: shards %v, %v; want only %s", ents, err, large.Digest.Hex()[:2])
	}
	mustClose(t, ba)
	ba = openDisk(t, blobstore.CAS, dir, opts)
	blobstoretest.WantBlob(t, ba, small.Digest, small.Data)
	blobstoretest.WantBlob(t, ba, large.Digest, large.Data)
}

func TestDiskLock(t *testing.T) {
	dir := t.TempDir()
	ba := openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 1 << 20})
	if second, err := blobstore.NewDisk(blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 1 << 20, Logger: quiet}); err == nil {
		closeStore(second)
		t.Fatal("a second NewDisk on a directory in use succeeded")
	} else {
		t.Logf("second NewDisk: %v", err)
	}
	// The failed open did not disturb the first store.
	b := blobstoretest.NewBlob(digest.SHA256, []byte("still works"))
	blobstoretest.MustPut(t, ba, b.Digest, b.Data)
	mustClose(t, ba)
	ba = openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 1 << 20})
	blobstoretest.WantBlob(t, ba, b.Digest, b.Data)
}

func TestDiskRecoveryRemovesTmpLeftovers(t *testing.T) {
	dir := t.TempDir()
	ba := openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 1 << 20})
	b := blobstoretest.NewBlob(digest.SHA256, []byte("kept"))
	blobstoretest.MustPut(t, ba, b.Digest, b.Data)
	mustClose(t, ba)

	tmp := filepath.Join(dir, "tmp")
	for _, name := range []string{"put-123", "put-456", b.Digest.Hex() + "-4"} {
		if err := os.WriteFile(filepath.Join(tmp, name), []byte("partial"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(tmp, "nested", "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	ba = openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 1 << 20})
	wantTmpEmpty(t, dir)
	blobstoretest.WantBlob(t, ba, b.Digest, b.Data)
	// The store still writes through tmp.
	c := blobstoretest.NewBlob(digest.BLAKE3, []byte("new"))
	blobstoretest.MustPut(t, ba, c.Digest, c.Data)
	blobstoretest.WantBlob(t, ba, c.Digest, c.Data)
}

func TestDiskRecoveryRemovesTornAndForeignFiles(t *testing.T) {
	rng := blobstoretest.Rand(t)
	dir := t.TempDir()
	ba := openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 1 << 30})
	good := blobstoretest.RandomBlob(rng, digest.SHA256, 5000)
	torn := blobstoretest.RandomBlob(rng, digest.SHA256, 5000)
	tornB3 := blobstoretest.RandomBlob(rng, digest.BLAKE3, 70000)
	for _, b := range []blobstoretest.Blob{good, torn, tornB3} {
		blobstoretest.MustPut(t, ba, b.Digest, b.Data)
	}
	mustClose(t, ba)

	// Simulated torn writes: files at their final names with the wrong size.
	if err := os.WriteFile(blobPath(dir, torn.Digest), torn.Data[:1234], 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(blobPath(dir, tornB3.Digest), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// A torn write of a blob the store never saw, too long rather than short.
	never := blobstoretest.RandomBlob(rng, digest.SHA256, 100)
	if err := os.MkdirAll(filepath.Dir(blobPath(dir, never.Digest)), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(blobPath(dir, never.Digest), append(never.Data, 0), 0o644); err != nil {
		t.Fatal(err)
	}
	// Files whose names are not blob names.
	shard := filepath.Dir(blobPath(dir, good.Digest))
	foreign := []string{
		filepath.Join(shard, "garbage"),
		filepath.Join(shard, good.Digest.Hex()+"-abc"),
		filepath.Join(shard, strings.ToUpper(good.Digest.Hex())+"-5000"),
		filepath.Join(shard, good.Digest.Hex()[:10]+"-5000"),
	}
	for _, p := range foreign {
		if err := os.WriteFile(p, good.Data, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	ba = openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 1 << 30})
	for _, b := range []blobstoretest.Blob{torn, tornB3, never} {
		wantNoFile(t, blobPath(dir, b.Digest))
		blobstoretest.WantAbsent(t, ba, b.Digest)
	}
	for _, p := range foreign {
		wantNoFile(t, p)
	}
	blobstoretest.WantBlob(t, ba, good.Digest, good.Data)
	// The torn blobs can be stored again.
	blobstoretest.MustPut(t, ba, torn.Digest, torn.Data)
	blobstoretest.WantBlob(t, ba, torn.Digest, torn.Data)
}

func TestDiskTruncatedWhileOpenNotServed(t *testing.T) {
	rng := blobstoretest.Rand(t)
	dir := t.TempDir()
	ba := openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 1 << 30})
	for _, n := range []int{100, 3 << 20} {
		b := blobstoretest.RandomBlob(rng, digest.SHA256, n)
		blobstoretest.MustPut(t, ba, b.Digest, b.Data)
		if err := os.Truncate(blobPath(dir, b.Digest), int64(n/2)); err != nil {
			t.Fatal(err)
		}
		blobstoretest.WantAbsent(t, ba, b.Digest)
		wantNoFile(t, blobPath(dir, b.Digest))
	}
}

// corruptFile flips one bit of the byte at off in path.
func corruptFile(t testing.TB, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [1]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x01
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

func TestDiskCorruptSmallBlobNotServed(t *testing.T) {
	rng := blobstoretest.Rand(t)
	for _, reopen := range []bool{false, true} {
		t.Run(fmt.Sprintf("reopen=%v", reopen), func(t *testing.T) {
			dir := t.TempDir()
			opts := blobstore.DiskOptions{MaxSize: 1 << 30, VerifyBelow: 1 << 30}
			ba := openDisk(t, blobstore.CAS, dir, opts)
			var blobs []blobstoretest.Blob
			for i, n := range []int{1, 100, 70000, 2 << 20} {
				b := blobstoretest.RandomBlob(rng, digest.Functions[i%2], n)
				blobstoretest.MustPut(t, ba, b.Digest, b.Data)
				blobs = append(blobs, b)
			}
			for i, b := range blobs {
				// Same size, different bytes: only the hash tells.
				corruptFile(t, blobPath(dir, b.Digest), int64(i*7919)%b.Digest.Size())
			}
			if reopen {
				mustClose(t, ba)
				ba = openDisk(t, blobstore.CAS, dir, opts)
			}
			for _, b := range blobs {
				if !blobstoretest.Present(t, ba, b.Digest) {
					// Not required, but then the test below proves nothing.
					t.Fatalf("corrupt blob %s not indexed before the first read", b.Digest.Sprint())
				}
				_, err := ba.Get(context.Background(), b.Digest)
				blobstoretest.WantCode(t, err, codes.NotFound, "Get of a corrupt blob")
				wantNoFile(t, blobPath(dir, b.Digest))
				blobstoretest.WantAbsent(t, ba, b.Digest)
				blobstoretest.MustPut(t, ba, b.Digest, b.Data)
				blobstoretest.WantBlob(t, ba, b.Digest, b.Data)
			}
		})
	}
}

func TestDiskCorruptLargeBlobDataLoss(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) { testDiskCorruptLargeBlobDataLoss(t, direct) })
	}
}

func testDiskCorruptLargeBlobDataLoss(t *testing.T, direct bool) {
	rng := blobstoretest.Rand(t)
	dir := t.TempDir()
	ba := openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 1 << 30, VerifyBelow: 0, VerifySampleRate: 1, DirectIO: direct})
	const n = 4<<20 + 123
	for _, off := range []int64{0, n / 2, n - 1} {
		for _, fn := range digest.Functions {
			b := blobstoretest.RandomBlob(rng, fn, n)
			blobstoretest.MustPut(t, ba, b.Digest, b.Data)
			blobstoretest.WantBlob(t, ba, b.Digest, b.Data) // verified read of a good blob
			corruptFile(t, blobPath(dir, b.Digest), off)
			rc, err := ba.Get(context.Background(), b.Digest)
			if err != nil {
				t.Fatalf("Get of a large blob (verified while streaming): %v", err)
			}
			got, err := io.ReadAll(rc)
			rc.Close()
			if err == nil {
				t.Fatalf("reading a large blob corrupted at byte %d ended with io.EOF after %d bytes", off, len(got))
			}
			blobstoretest.WantCode(t, err, codes.DataLoss, "reading a corrupt large blob")
			wantNoFile(t, blobPath(dir, b.Digest))
			blobstoretest.WantAbsent(t, ba, b.Digest)
		}
	}
}

func TestDiskFailedPutsLeaveNothing(t *testing.T) {
	rng := blobstoretest.Rand(t)
	dir := t.TempDir()
	ba := openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: 1 << 30})
	for _, n := range []int{10, 2 << 20} {
		b := blobstoretest.RandomBlob(rng, digest.SHA256, n)
		if err := ba.Put(context.Background(), b.Digest, blobstoretest.ErrAfterReader(b.Data, n/2)); err == nil {
			t.Fatal("Put with a failing reader succeeded")
		}
		err := ba.Put(context.Background(), b.Digest, blobstoretest.StreamReader(b.Data[1:]))
		blobstoretest.WantCode(t, err, codes.InvalidArgument, "Put of short data")
		wantNoFile(t, blobPath(dir, b.Digest))
	}
	wantTmpEmpty(t, dir)
	if files := blobFiles(t, dir); len(files) != 0 {
		t.Fatalf("failed Puts left files: %v", files)
	}
}

// kill9Env makes TestDiskKill9 act as the writer process that is killed.
const kill9Env = "TVIXFARM_BLOBSTORE_KILL9_DIR"

// kill9Options: blobs under 64 KiB go to pack files of 1 MiB, the others
// to files of their own, so the kill can tear either.
var kill9Options = blobstore.DiskOptions{MaxSize: 1 << 40, PackBelow: 64 << 10, PackSize: 1 << 20}

// packRecords lists the digests of the records in the pack files of a disk
// store, as pack.go lays them out (a 48-byte header: "TFP1", function, 3
// zero bytes, uint32 size, 32-byte hash, CRC; then the data), up to the
// first record that is not intact.
func packRecords(t testing.TB, dir string) []digest.Digest {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(dir, "packs", "*.pack"))
	if err != nil {
		t.Fatal(err)
	}
	var ds []digest.Digest
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		for len(data) >= 48 && string(data[:4]) == "TFP1" {
			fn := digest.Function(data[4])
			size := int64(binary.LittleEndian.Uint32(data[8:]))
			if (fn != digest.SHA256 && fn != digest.BLAKE3) || int64(len(data)-48) < size {
				break
			}
			var h [digest.HashSize]byte
			copy(h[:], data[12:44])
			ds = append(ds, digest.New(fn, h, size))
			data = data[48+size:]
		}
	}
	return ds
}

// TestDiskKill9 runs a child process that stores random blobs into a disk
// store as fast as it can, kills it with SIGKILL, and checks that the
// reopened store serves every blob the child reported stored, and that
// every blob it indexes reads back intact.
func TestDiskKill9(t *testing.T) {
	if dir := os.Getenv(kill9Env); dir != "" {
		kill9Writer(dir)
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestDiskKill9$", "-test.count=1")
	cmd.Env = append(os.Environ(), kill9Env+"="+dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var (
		mu       sync.Mutex
		reported []string
		first    = make(chan struct{})
		drained  = make(chan struct{})
	)
	go func() {
		defer close(drained)
		sc := bufio.NewScanner(out)
		once := sync.Once{}
		for sc.Scan() {
			line := sc.Text()
			if !strings.HasPrefix(line, "stored ") {
				continue
			}
			mu.Lock()
			reported = append(reported, strings.TrimPrefix(line, "stored "))
			mu.Unlock()
			once.Do(func() { close(first) })
		}
	}()
	select {
	case <-first:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("writer stored nothing within 30s; stderr:\n%s", stderr.String())
	}
	time.Sleep(300 * time.Millisecond)
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-drained
	werr := cmd.Wait()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("writer did not die of SIGKILL: %v; stderr:\n%s", werr, stderr.String())
	}
	leftovers, _ := os.ReadDir(filepath.Join(dir, "tmp"))
	t.Logf("writer reported %d blobs stored before SIGKILL; %d files left in tmp", len(reported), len(leftovers))

	// Reopen without trusting anything: verify every read.
	opts := kill9Options
	opts.VerifySampleRate = 1
	ba := openDisk(t, blobstore.CAS, dir, opts)
	wantTmpEmpty(t, dir)
	for _, line := range reported {
		var fnName, hex string
		var size int64
		if _, err := fmt.Sscan(line, &fnName, &hex, &size); err != nil {
			t.Fatalf("bad line %q: %v", line, err)
		}
		fn, _ := digest.FunctionFromName(fnName)
		d, err := digest.Parse(fn, hex, size)
		if err != nil {
			t.Fatal(err)
		}
		if !blobstoretest.Present(t, ba, d) {
			t.Errorf("blob %s, reported stored before the kill, is missing", d.Sprint())
		}
	}
	files := blobFiles(t, dir)
	records := packRecords(t, dir)
	t.Logf("after reopening: %d blob files, %d pack records", len(files), len(records))
	if len(files)+len(records) < len(reported) {
		t.Errorf("%d blob files and %d pack records for %d reported blobs", len(files), len(records), len(reported))
	}
	for _, d := range records {
		if !blobstoretest.Present(t, ba, d) {
			continue // the torn tail, truncated away at open
		}
		data, err := blobstoretest.ReadBlob(context.Background(), ba, d)
		if err != nil {
			t.Errorf("indexed packed blob %s does not read back: %v", d.Sprint(), err)
			continue
		}
		if got := digest.Compute(d.Function(), data); got != d {
			t.Errorf("indexed packed blob %s read back as %s", d.Sprint(), got.Sprint())
		}
	}
	for _, p := range files {
		fn, _ := digest.FunctionFromName(filepath.Base(filepath.Dir(filepath.Dir(p))))
		h, sz, _ := strings.Cut(filepath.Base(p), "-")
		size, err := strconv.ParseInt(sz, 10, 64)
		if err != nil {
			t.Fatalf("file %s survived reopening with an invalid name", p)
		}
		d, err := digest.Parse(fn, h, size)
		if err != nil {
			t.Fatalf("file %s survived reopening with an invalid name: %v", p, err)
		}
		if !blobstoretest.Present(t, ba, d) {
			t.Errorf("file %s is on disk but not indexed", p)
			continue
		}
		data, err := blobstoretest.ReadBlob(context.Background(), ba, d)
		if err != nil {
			t.Errorf("indexed blob %s does not read back: %v", d.Sprint(), err)
			continue
		}
		if got := digest.Compute(fn, data); got != d {
			t.Errorf("indexed blob %s read back as %s", d.Sprint(), got.Sprint())
		}
	}
}

// kill9Writer is the child process of TestDiskKill9: four goroutines store
// random blobs of up to 6 MiB, streamed, and report each stored blob on
// stdout once Put has returned. It runs until it is killed (or for at most
// a minute, in case its parent is gone).
func kill9Writer(dir string) {
	ba, err := blobstore.NewDisk(blobstore.CAS, dir, kill9Options)
	if err != nil {
		fmt.Fprintln(os.Stderr, "writer:", err)
		os.Exit(2)
	}
	var mu sync.Mutex
	for w := 0; w < 4; w++ {
		go func() {
			rng := rand.New(rand.NewPCG(uint64(os.Getpid()), uint64(w)))
			for i := 0; ; i++ {
				var n int
				switch i % 4 {
				case 0:
					n = rng.IntN(4096)
				case 1:
					n = rng.IntN(1 << 20)
				case 2:
					n = 1<<20 + rng.IntN(5<<20)
				default:
					n = rng.IntN(64 << 10)
				}
				b := blobstoretest.RandomBlob(rng, digest.Functions[rng.IntN(2)], n)
				var r io.Reader = blobstoretest.StreamReader(b.Data)
				if i%3 == 0 {
					r = bytes.NewReader(b.Data)
				}
				if err := ba.Put(context.Background(), b.Digest, r); err != nil {
					fmt.Fprintln(os.Stderr, "writer: Put:", err)
					os.Exit(2)
				}
				mu.Lock()
				fmt.Printf("stored %s %s %d\n", b.Digest.Function(), b.Digest.Hex(), b.Digest.Size())
				mu.Unlock()
			}
		}()
	}
	time.Sleep(time.Minute)
	os.Exit(3)
}

// TestDiskFull mounts a 1 MiB tmpfs (this needs root; the test is skipped
// otherwise) and checks that a Put that does not fit fails with
// ResourceExhausted and leaves nothing behind.
func TestDiskFull(t *testing.T) {
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("skipping: cannot mount a tmpfs (needs root): %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	free := func() uint64 {
		var st unix.Statfs_t
		if err := unix.Statfs(mnt, &st); err != nil {
			t.Fatal(err)
		}
		return st.Bavail * uint64(st.Bsize)
	}
	rng := blobstoretest.Rand(t)
	for _, tc := range []struct {
		name string
		kind blobstore.Kind
		opts blobstore.DiskOptions
	}{
		{"cas", blobstore.CAS, blobstore.DiskOptions{MaxSize: 1 << 30}},
		{"action cache", blobstore.AC, blobstore.DiskOptions{MaxSize: 1 << 30}},
		// Every blob of this test goes into a pack file.
		{"cas packed", blobstore.CAS, blobstore.DiskOptions{MaxSize: 1 << 30, PackBelow: 4 << 20}},
	} {
		kind := tc.kind
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(mnt, strings.ReplaceAll(tc.name, " ", "-"))
			ba := openDisk(t, kind, dir, tc.opts)
			t.Cleanup(func() { closeStore(ba); os.RemoveAll(dir) })
			before := free()
			t.Logf("%d bytes free on the tmpfs", before)

			// Bigger than the whole file system, streamed and as a bytes.Reader.
			big := blobstoretest.RandomBlob(rng, digest.SHA256, 2<<20)
			for _, rd := range blobstoretest.Readers {
				err := ba.Put(context.Background(), big.Digest, rd.New(big.Data))
				blobstoretest.WantCode(t, err, codes.ResourceExhausted, "Put of a blob larger than the free space ("+rd.Name+")")
				blobstoretest.WantAbsent(t, ba, big.Digest)
				wantTmpEmpty(t, dir)
				if files := blobFiles(t, dir); len(files) != 0 {
					t.Fatalf("failed Put left files: %v", files)
				}
				if recs := packRecords(t, dir); len(recs) != 0 {
					t.Fatalf("failed Put left pack records: %v", recs)
				}
				if after := free(); after != before {
					t.Fatalf("free space went from %d to %d bytes after a failed Put", before, after)
				}
			}

			// Fill most of the space, then overflow it with a small blob
			// (the in-memory fast path of batch uploads).
			fill := blobstoretest.RandomBlob(rng, digest.SHA256, int(before)-100<<10)
			blobstoretest.MustPut(t, ba, fill.Digest, fill.Data)
			over := blobstoretest.RandomBlob(rng, digest.BLAKE3, 200<<10)
			for _, rd := range blobstoretest.Readers {
				err := ba.Put(context.Background(), over.Digest, rd.New(over.Data))
				blobstoretest.WantCode(t, err, codes.ResourceExhausted, "Put of a blob larger than the free space ("+rd.Name+")")
				blobstoretest.WantAbsent(t, ba, over.Digest)
				wantTmpEmpty(t, dir)
			}
			if files, recs := blobFiles(t, dir), packRecords(t, dir); len(files)+len(recs) != 1 {
				t.Fatalf("want only the filler blob on disk, got files %v, pack records %v", files, recs)
			}
			blobstoretest.WantBlob(t, ba, fill.Digest, fill.Data)
			// A blob that fits still goes in.
			small := blobstoretest.RandomBlob(rng, digest.SHA256, 1000)
			blobstoretest.MustPut(t, ba, small.Digest, small.Data)
			blobstoretest.WantBlob(t, ba, small.Digest, small.Data)
		})
	}
}

// TestDiskPackedEvictionConcurrent hammers a small packed store, which
// evicts and refreshes packs all the time, from 16 goroutines: a Get may
// miss, but never returns wrong bytes, and the bound holds.
func TestDiskPackedEvictionConcurrent(t *testing.T) {
	dir := t.TempDir()
	const max = 2 << 20
	ba := openDisk(t, blobstore.CAS, dir, blobstore.DiskOptions{MaxSize: max, PackBelow: 16 << 10, PackSize: 128 << 10})
	rng := blobstoretest.Rand(t)
	var blobs []blobstoretest.Blob
	for i := 0; i < 400; i++ {
		n := rng.IntN(8 << 10)
		if i%10 == 0 {
			n = 16<<10 + rng.IntN(48<<10) // a file of its own
		}
		blobs = append(blobs, blobstoretest.RandomBlob(rng, digest.Functions[i%2], n))
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for w := 0; w < 16; w++ {
		seed := rng.Uint64()
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 1))
			for op := 0; op < 300; op++ {
				// Skewed towards the first blobs, so some stay hot.
				i := min(rng.IntN(len(blobs)), rng.IntN(len(blobs)))
				b := blobs[i]
				switch rng.IntN(3) {
				case 0:
					if err := ba.Put(context.Background(), b.Digest, bytes.NewReader(b.Data)); err != nil {
						errs <- fmt.Errorf("Put: %v", err)
						return
					}
				case 1:
					data, err := blobstoretest.ReadBlob(context.Background(), ba, b.Digest)
					if err == nil && !bytes.Equal(data, b.Data) {
						errs <- fmt.Errorf("Get(%s) returned wrong bytes", b.Digest.Sprint())
						return
					}
					if err != nil && !blobstore.IsNotFound(err) {
						errs <- fmt.Errorf("Get(%s): %v", b.Digest.Sprint(), err)
						return
					}
				default:
					if _, err := ba.FindMissing(context.Background(), []digest.Digest{b.Digest, blobs[rng.IntN(len(blobs))].Digest}); err != nil {
						errs <- fmt.Errorf("FindMissing: %v", err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	var onDisk int64
	for _, p := range blobFiles(t, dir) {
		fi, err := os.Stat(p)
		if err == nil {
			onDisk += fi.Size()
		}
	}
	packs, _ := filepath.Glob(filepath.Join(dir, "packs", "*.pack"))
	for _, p := range packs {
		if fi, err := os.Stat(p); err == nil {
			onDisk += fi.Size()
		}
	}
	// The current pack may not be evicted, so allow one pack over.
	if onDisk > max+128<<10 {
		t.Errorf("%d bytes on disk, max %d", onDisk, max)
	}
	// Everything still indexed reads back intact.
	for _, b := range blobs {
		if blobstoretest.Present(t, ba, b.Digest) {
			data, err := blobstoretest.ReadBlob(context.Background(), ba, b.Digest)
			if err != nil && !blobstore.IsNotFound(err) {
				t.Errorf("Get(%s): %v", b.Digest.Sprint(), err)
			} else if err == nil && !bytes.Equal(data, b.Data) {
				t.Errorf("Get(%s) returned wrong bytes", b.Digest.Sprint())
			}
		}
	}
	wantTmpEmpty(t, dir)
}
