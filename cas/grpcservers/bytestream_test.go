package grpcservers_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"

	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"

	"tvixfarm/cas/digest"
)

const chunk64K = 64 << 10

func TestByteStreamLargeBlob(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		for i, instance := range []string{"", "a/b"} {
			t.Run(fmt.Sprintf("instance=%q", instance), func(t *testing.T) {
				ctx := testCtx(t)
				size := 10 << 20
				if instance != "" {
					size = 2<<20 + 1
				}
				data := randBytes(uint64(fc.fn)*10+uint64(i), size)
				d := fc.digest(data)
				wname := writeName(instance, newUUID(), "blobs", fc, d)
				if fc.fn == digest.BLAKE3 && !strings.Contains(wname, fmt.Sprintf("/blobs/blake3/%s/%d", d.Hex(), size)) {
					t.Fatalf("bad test resource name %s", wname)
				}
				resp, err := e.bsWrite(ctx, wname, data, 0, chunk64K)
				if err != nil {
					t.Fatalf("Write: %v", err)
				}
				if resp.CommittedSize != d.Size() {
					t.Fatalf("Write: committed_size %d, want %d", resp.CommittedSize, d.Size())
				}
				if !e.present(t, instance, fc, d.Proto()) {
					t.Fatalf("blob missing after Write")
				}
				qs, err := e.bs.QueryWriteStatus(ctx, &bspb.QueryWriteStatusRequest{ResourceName: wname})
				if err != nil || !qs.Complete || qs.CommittedSize != d.Size() {
					t.Fatalf("QueryWriteStatus after Write: %v, %v", qs, err)
				}

				rname := readName(instance, "blobs", fc, d)
				got, err := e.bsRead(ctx, rname, 0, 0)
				if err != nil {
					t.Fatalf("Read: %v", err)
				}
				if !bytes.Equal(got, data) {
					t.Fatalf("Read: %d bytes differ from the %d written", len(got), len(data))
				}
				for _, r := range []struct{ off, limit int64 }{
					{0, 1}, {1234567, 100000}, {d.Size() - 10, 0}, {d.Size() - 10, 100}, {d.Size() / 2, 1<<20 + 3}, {d.Size(), 0}, {d.Size(), 5},
				} {
					got, err := e.bsRead(ctx, rname, r.off, r.limit)
					if err != nil {
						t.Fatalf("Read(offset %d, limit %d): %v", r.off, r.limit, err)
					}
					end := d.Size()
					if r.limit > 0 {
						end = min(end, r.off+r.limit)
					}
					if !bytes.Equal(got, data[r.off:end]) {
						t.Fatalf("Read(offset %d, limit %d): got %d bytes, want data[%d:%d]", r.off, r.limit, len(got), r.off, end)
					}
				}
				_, err = e.bsRead(ctx, rname, d.Size()+1, 0)
				wantCode(t, err, codes.OutOfRange, "Read with read_offset beyond the size")
				_, err = e.bsRead(ctx, rname, -1, 0)
				wantCode(t, err, codes.OutOfRange, "Read with a negative read_offset")
				_, err = e.bsRead(ctx, rname, 0, -1)
				wantCode(t, err, codes.InvalidArgument, "Read with a negative read_limit")

				// The blob is readable through the batch API's instance too.
				if instance != "" {
					if e.present(t, "", fc, d.Proto()) != true {
						t.Fatalf("instances share the default store, but the blob is missing in instance \"\"")
					}
				}
			})
		}
	})
}

// TestByteStreamVerifiedRead reads large blobs through the disk store's
// verifying reader (sampled verification at rate 1).
func TestByteStreamVerifiedRead(t *testing.T) {
	t.Parallel()
	e := newEnvWith(t, envOptions{verifySampleRate: 1})
	forEachFn(t, func(t *testing.T, fc fnCase) {
		ctx := testCtx(t)
		data := randBytes(uint64(fc.fn)+77, 3<<20)
		d := fc.digest(data)
		if _, err := e.bsWrite(ctx, writeName("", newUUID(), "blobs", fc, d), data, 0, 1<<20); err != nil {
			t.Fatal(err)
		}
		rname := readName("", "blobs", fc, d)
		for _, r := range []struct{ off, limit int64 }{{0, 0}, {1 << 20, 0}, {12345, 1 << 20}, {d.Size(), 0}} {
			got, err := e.bsRead(ctx, rname, r.off, r.limit)
			end := d.Size()
			if r.limit > 0 {
				end = r.off + r.limit
			}
			if err != nil || !bytes.Equal(got, data[r.off:end]) {
				t.Fatalf("Read(offset %d, limit %d): %d bytes, %v", r.off, r.limit, len(got), err)
			}
		}
	})
}

func TestByteStreamMissingAndEmpty(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		ctx := testCtx(t)
		missing := fc.digest([]byte("not there"))
		_, err := e.bsRead(ctx, readName("", "blobs", fc, missing), 0, 0)
		wantCode(t, err, codes.NotFound, "Read of a missing blob")
		_, err = e.bsRead(ctx, readName("", "compressed-blobs/zstd", fc, missing), 0, 0)
		wantCode(t, err, codes.NotFound, "compressed Read of a missing blob")
		_, err = e.bs.QueryWriteStatus(ctx, &bspb.QueryWriteStatusRequest{ResourceName: writeName("", newUUID(), "blobs", fc, missing)})
		wantCode(t, err, codes.NotFound, "QueryWriteStatus of an unknown upload")

		empty := fc.digest(nil)
		got, err := e.bsRead(ctx, readName("a/b", "blobs", fc, empty), 0, 0)
		if err != nil || len(got) != 0 {
			t.Fatalf("Read(empty blob) = %d bytes, %v", len(got), err)
		}
		got, err = e.bsRead(ctx, readName("", "compressed-blobs/zstd", fc, empty), 0, 0)
		if err != nil || len(zstdDecompress(t, got)) != 0 {
			t.Fatalf("compressed Read(empty blob) = %d bytes, %v", len(got), err)
		}
		resp, err := e.bsWrite(ctx, writeName("", newUUID(), "blobs", fc, empty), nil, 0, 1)
		if err != nil || resp.CommittedSize != 0 {
			t.Fatalf("Write(empty blob) = %v, %v", resp, err)
		}
		// The empty blob is always present, so the server may end a write
		// of it at once (committed_size 0) or refuse extra data.
		resp, err = e.bsWrite(ctx, writeName("", newUUID(), "blobs", fc, empty), []byte("x"), 0, 1)
		if err == nil && resp.CommittedSize != 0 {
			t.Fatalf("Write of 1 byte to the empty blob: committed_size %d", resp.CommittedSize)
		} else if err != nil {
			wantCode(t, err, codes.InvalidArgument, "Write of 1 byte to the empty blob")
		}
		bogus, err := digest.Parse(fc.fn, strings.Repeat("0", 64), 0)
		if err != nil {
			t.Fatal(err)
		}
		_, err = e.bsRead(ctx, readName("", "blobs", fc, bogus), 0, 0)
		wantCode(t, err, codes.NotFound, "Read of a size-0 blob that is not the empty blob")
	})
}

func TestByteStreamCompressed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		for _, instance := range []string{"", "a/b"} {
			ctx := testCtx(t)
			data := textBytes(uint64(fc.fn)+uint64(len(instance)), 1<<20)
			d := fc.digest(data)
			z := zstdCompress(t, data)
			wname := writeName(instance, newUUID(), "compressed-blobs/zstd", fc, d)
			resp, err := e.bsWrite(ctx, wname, z, 0, chunk64K)
			if err != nil {
				t.Fatalf("compressed Write: %v", err)
			}
			if resp.CommittedSize != int64(len(z)) {
				t.Fatalf("compressed Write: committed_size %d, want %d (compressed bytes)", resp.CommittedSize, len(z))
			}
			if !e.present(t, instance, fc, d.Proto()) {
				t.Fatalf("blob missing after compressed Write")
			}
			got, err := e.bsRead(ctx, readName(instance, "blobs", fc, d), 0, 0)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("Read after compressed Write: %d bytes, %v", len(got), err)
			}
			zgot, err := e.bsRead(ctx, readName(instance, "compressed-blobs/zstd", fc, d), 0, 0)
			if err != nil {
				t.Fatalf("compressed Read: %v", err)
			}
			if !bytes.Equal(zstdDecompress(t, zgot), data) {
				t.Fatalf("compressed Read: data differs")
			}
			if len(zgot) >= len(data) {
				t.Errorf("compressed Read: %d bytes for %d bytes of text", len(zgot), len(data))
			}
			// REAPI: read_offset of a compressed read counts uncompressed
			// bytes, and read_limit must be 0.
			for _, off := range []int64{12345, d.Size() - 1, d.Size()} {
				part, err := e.bsRead(ctx, readName(instance, "compressed-blobs/zstd", fc, d), off, 0)
				if err != nil {
					t.Fatalf("compressed Read(offset %d): %v", off, err)
				}
				if !bytes.Equal(zstdDecompress(t, part), data[off:]) {
					t.Fatalf("compressed Read(offset %d) does not decompress to data[%d:]", off, off)
				}
			}
			_, err = e.bsRead(ctx, readName(instance, "compressed-blobs/zstd", fc, d), 10, 100)
			wantCode(t, err, codes.InvalidArgument, "compressed Read with a read_limit")
			_, err = e.bsRead(ctx, readName(instance, "compressed-blobs/zstd", fc, d), d.Size()+1, 0)
			wantCode(t, err, codes.OutOfRange, "compressed Read beyond the end")

			// An uncompressed write then a compressed read.
			plain := randBytes(uint64(fc.fn)+300+uint64(len(instance)), 1<<20)
			pd := fc.digest(plain)
			if _, err := e.bsWrite(ctx, writeName(instance, newUUID(), "blobs", fc, pd), plain, 0, chunk64K); err != nil {
				t.Fatal(err)
			}
			zgot, err = e.bsRead(ctx, readName(instance, "compressed-blobs/zstd", fc, pd), 0, 0)
			if err != nil || !bytes.Equal(zstdDecompress(t, zgot), plain) {
				t.Fatalf("compressed Read of an uncompressed upload: %v", err)
			}

			// Writing a stored blob compressed ends early with -1.
			stream, err := e.bs.Write(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := stream.Send(&bspb.WriteRequest{ResourceName: writeName(instance, newUUID(), "compressed-blobs/zstd", fc, d), Data: z[:chunk64K]}); err != nil {
				t.Fatal(err)
			}
			resp, err = stream.CloseAndRecv()
			if err != nil || resp.CommittedSize != -1 {
				t.Fatalf("compressed Write of a stored blob: %v, %v; want committed_size -1", resp, err)
			}

			// Corrupt compressed data, and compressed data of other bytes.
			other := textBytes(uint64(fc.fn)+500, 256<<10)
			od := fc.digest(other)
			bad := append([]byte{}, zstdCompress(t, other)...)
			for i := 100; i < len(bad)-100; i += 97 {
				bad[i] ^= 0x5a
			}
			_, err = e.bsWrite(ctx, writeName(instance, newUUID(), "compressed-blobs/zstd", fc, od), bad, 0, chunk64K)
			wantCode(t, err, codes.InvalidArgument, "compressed Write of corrupt zstd data")
			_, err = e.bsWrite(ctx, writeName(instance, newUUID(), "compressed-blobs/zstd", fc, od), []byte("not zstd at all"), 0, chunk64K)
			wantCode(t, err, codes.InvalidArgument, "compressed Write of non-zstd data")
			_, err = e.bsWrite(ctx, writeName(instance, newUUID(), "compressed-blobs/zstd", fc, od), zstdCompress(t, append([]byte("Z"), other[1:]...)), 0, chunk64K)
			wantCode(t, err, codes.InvalidArgument, "compressed Write of other data")
			if e.present(t, instance, fc, od.Proto()) {
				t.Fatalf("bad compressed upload was stored")
			}
		}
	})
}

func TestByteStreamWrongData(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		ctx := testCtx(t)
		data := randBytes(uint64(fc.fn)+1000, 1<<20)
		d := fc.digest(data)
		wrong := append([]byte{}, data...)
		wrong[len(wrong)/2] ^= 1
		cases := map[string][]byte{
			"flipped bit": wrong,
			"too long":    append(append([]byte{}, data...), 'x'),
			"too short":   data[:len(data)-1],
			"nothing":     nil,
		}
		for name, body := range cases {
			wname := writeName("", newUUID(), "blobs", fc, d)
			_, err := e.bsWrite(ctx, wname, body, 0, chunk64K)
			wantCode(t, err, codes.InvalidArgument, "Write with "+name)
			if name == "flipped bit" && !containsAll(fmt.Sprint(err), d.Hex(), fc.digest(wrong).Hex()) {
				t.Errorf("Write with wrong data: error %v does not name expected and actual digest", err)
			}
			if e.present(t, "", fc, d.Proto()) {
				t.Fatalf("Write with %s stored the blob", name)
			}
			_, err = e.bsRead(ctx, readName("", "blobs", fc, d), 0, 0)
			wantCode(t, err, codes.NotFound, "Read after a failed Write with "+name)
			_, err = e.bs.QueryWriteStatus(ctx, &bspb.QueryWriteStatusRequest{ResourceName: wname})
			wantCode(t, err, codes.NotFound, "QueryWriteStatus after a failed Write with "+name)
		}

		// Protocol errors: a bad write_offset, a changed resource name.
		stream, err := e.bs.Write(ctx)
		if err != nil {
			t.Fatal(err)
		}
		wname := writeName("", newUUID(), "blobs", fc, d)
		stream.Send(&bspb.WriteRequest{ResourceName: wname, Data: data[:100]})
		stream.Send(&bspb.WriteRequest{WriteOffset: 50, Data: data[50:200]})
		_, err = stream.CloseAndRecv()
		wantCode(t, err, codes.InvalidArgument, "Write with a wrong write_offset")

		stream, err = e.bs.Write(ctx)
		if err != nil {
			t.Fatal(err)
		}
		stream.Send(&bspb.WriteRequest{ResourceName: writeName("", newUUID(), "blobs", fc, d), Data: data[:100]})
		stream.Send(&bspb.WriteRequest{ResourceName: writeName("", newUUID(), "blobs", fc, d), WriteOffset: 100, Data: data[100:200]})
		_, err = stream.CloseAndRecv()
		wantCode(t, err, codes.InvalidArgument, "Write with a changed resource name")

		// A first message at an offset of an upload never started.
		_, err = e.bsWrite(ctx, writeName("", newUUID(), "blobs", fc, d), data, 100, chunk64K)
		wantCode(t, err, codes.InvalidArgument, "Write starting at offset 100")

		// A stream closed without finish_write.
		stream, err = e.bs.Write(ctx)
		if err != nil {
			t.Fatal(err)
		}
		stream.Send(&bspb.WriteRequest{ResourceName: writeName("", newUUID(), "blobs", fc, d), Data: data[:100]})
		_, err = stream.CloseAndRecv()
		wantCode(t, err, codes.InvalidArgument, "Write without finish_write")

		if e.present(t, "", fc, d.Proto()) {
			t.Fatalf("blob stored by failed writes")
		}
		// A good write still works afterwards.
		if resp, err := e.bsWrite(ctx, writeName("", newUUID(), "blobs", fc, d), data, 0, chunk64K); err != nil || resp.CommittedSize != d.Size() {
			t.Fatalf("Write after failed ones: %v, %v", resp, err)
		}
	})
}

func TestByteStreamResumableWrite(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		for _, instance := range []string{"", "a/b"} {
			data := randBytes(uint64(fc.fn)+2000+uint64(len(instance)), 4<<20)
			d := fc.digest(data)
			half := d.Size() / 2
			wname := writeName(instance, newUUID(), "blobs", fc, d)

			// Send half, then break the stream.
			sctx, cancel := context.WithCancel(testCtx(t))
			stream, err := e.bs.Write(sctx)
			if err != nil {
				t.Fatal(err)
			}
			for off := int64(0); off < half; off += chunk64K {
				req := &bspb.WriteRequest{WriteOffset: off, Data: data[off:min(off+chunk64K, half)]}
				if off == 0 {
					req.ResourceName = wname
				}
				if err := stream.Send(req); err != nil {
					t.Fatalf("Send at %d: %v", off, err)
				}
			}
			e.waitCommitted(t, wname, half)
			cancel()

			// The client resumes as REAPI describes: QueryWriteStatus, then
			// Write from committed_size on a new stream.
			qs := e.waitCommitted(t, wname, half)
			if qs.Complete {
				t.Fatalf("QueryWriteStatus of a half upload: complete")
			}
			if e.present(t, instance, fc, d.Proto()) {
				t.Fatalf("half upload is visible")
			}
			// Resuming at a wrong offset fails and leaves the upload
			// resumable.
			for _, off := range []int64{half + chunk64K, half - 1} {
				_, err := e.bsWrite(testCtx(t), wname, data, off, chunk64K)
				wantCode(t, err, codes.InvalidArgument, fmt.Sprintf("Write resuming at %d with %d committed", off, half))
			}
			e.waitCommitted(t, wname, half)
			resp, err := e.bsWrite(testCtx(t), wname, data, qs.CommittedSize, chunk64K)
			if err != nil {
				t.Fatalf("resumed Write at %d: %v", qs.CommittedSize, err)
			}
			if resp.CommittedSize != d.Size() {
				t.Fatalf("resumed Write: committed_size %d, want %d", resp.CommittedSize, d.Size())
			}
			got, err := e.bsRead(testCtx(t), readName(instance, "blobs", fc, d), 0, 0)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("Read after resumed Write: %d bytes, %v", len(got), err)
			}
			qs, err = e.bs.QueryWriteStatus(testCtx(t), &bspb.QueryWriteStatusRequest{ResourceName: wname})
			if err != nil || !qs.Complete || qs.CommittedSize != d.Size() {
				t.Fatalf("QueryWriteStatus after the resumed Write: %v, %v", qs, err)
			}
		}
	})
}

// TestByteStreamResumeAfterCleanClose resumes an upload whose client
// half-closed the stream without finish_write.
func TestByteStreamResumeAfterCleanClose(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	fc := fnCases[1]
	data := randBytes(4000, 1<<20)
	d := fc.digest(data)
	wname := writeName("", newUUID(), "blobs", fc, d)
	stream, err := e.bs.Write(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	stream.Send(&bspb.WriteRequest{ResourceName: wname, Data: data[:1000]})
	_, err = stream.CloseAndRecv()
	wantCode(t, err, codes.InvalidArgument, "Write without finish_write")
	qs := e.waitCommitted(t, wname, 1000)
	if _, err := e.bsWrite(testCtx(t), wname, data, qs.CommittedSize, chunk64K); err != nil {
		t.Fatalf("resumed Write: %v", err)
	}
	// Restarting an upload from 0 is allowed too.
	wname = writeName("", newUUID(), "blobs", fc, fc.digest(data[:5000]))
	stream, _ = e.bs.Write(testCtx(t))
	stream.Send(&bspb.WriteRequest{ResourceName: wname, Data: data[:1000]})
	stream.CloseAndRecv()
	e.waitCommitted(t, wname, 1000)
	if _, err := e.bsWrite(testCtx(t), wname, data[:5000], 0, 1000); err != nil {
		t.Fatalf("restarted Write: %v", err)
	}
	if !e.present(t, "", fc, fc.pd(data[:5000])) {
		t.Fatalf("restarted upload not stored")
	}
}

func TestByteStreamWriteExisting(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		ctx := testCtx(t)
		data := randBytes(uint64(fc.fn)+3000, 2<<20)
		d := fc.digest(data)
		if _, err := e.bsWrite(ctx, writeName("", newUUID(), "blobs", fc, d), data, 0, chunk64K); err != nil {
			t.Fatal(err)
		}
		// The server answers after the first message, without waiting for
		// finish_write: closing the stream then gets the response.
		stream, err := e.bs.Write(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := stream.Send(&bspb.WriteRequest{ResourceName: writeName("a/b", newUUID(), "blobs", fc, d), Data: data[:chunk64K]}); err != nil {
			t.Fatal(err)
		}
		resp, err := stream.CloseAndRecv()
		if err != nil || resp.CommittedSize != d.Size() {
			t.Fatalf("Write of a stored blob: %v, %v; want committed_size %d", resp, err, d.Size())
		}
		// A client sending everything gets the same answer.
		resp, err = e.bsWrite(ctx, writeName("", newUUID(), "blobs", fc, d), data, 0, chunk64K)
		if err != nil || resp.CommittedSize != d.Size() {
			t.Fatalf("full Write of a stored blob: %v, %v", resp, err)
		}
	})
}

func TestByteStreamConcurrentWriters(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		for _, sameUUID := range []bool{false, true} {
			data := randBytes(uint64(fc.fn)+4000+map[bool]uint64{false: 0, true: 1}[sameUUID], 2<<20)
			d := fc.digest(data)
			uuid := newUUID()
			const writers = 3
			var wg sync.WaitGroup
			errs := make([]error, writers)
			sizes := make([]int64, writers)
			start := make(chan struct{})
			for w := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					id := uuid
					if !sameUUID {
						id = newUUID()
					}
					<-start
					resp, err := e.bsWrite(testCtx(t), writeName("", id, "blobs", fc, d), data, 0, 16<<10)
					errs[w] = err
					if resp != nil {
						sizes[w] = resp.CommittedSize
					}
				}()
			}
			close(start)
			wg.Wait()
			for w := range writers {
				if errs[w] != nil || sizes[w] != d.Size() {
					t.Fatalf("writer %d (same uuid: %v): committed_size %d, %v", w, sameUUID, sizes[w], errs[w])
				}
			}
			got, err := e.bsRead(testCtx(t), readName("", "blobs", fc, d), 0, 0)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("Read after concurrent writes: %v", err)
			}
		}
	})
}

func TestByteStreamBadResourceNames(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		ctx := testCtx(t)
		data := []byte("traversal target " + fc.name)
		d := fc.digest(data)
		e.batchUpload(t, "", fc, data)
		p := fc.blobPath(d)
		u := newUUID()
		reads := []string{
			"../blobs/" + p,
			"a/../blobs/" + p,
			"./blobs/" + p,
			"a/./blobs/" + p,
			"/blobs/" + p,
			"a//blobs/" + p,
			"blobs/../" + p,
			"blobs/../../etc/passwd",
			"blobs/" + p + "/..",
			"blobs/" + p + "/extra",
			"blobs/" + d.Hex(),
			"blobs/" + d.Hex() + "/-1",
			"blobs/" + d.Hex() + "/+1",
			"blobs/" + d.Hex() + "/1e3",
			"blobs/" + strings.ToUpper(d.Hex()) + "/" + fmt.Sprint(d.Size()),
			"blobs/" + fc.name + "/" + fc.name + "/" + d.Hex() + "/" + fmt.Sprint(d.Size()),
			"compressed-blobs/gzip/" + p,
			"compressed-blobs/../blobs/" + p,
			"compressed-blobs/zstd/../" + p,
			"uploads/" + u + "/blobs/" + p,
			"actions/blobs/" + p,
			"",
			"blobs",
			"a/b",
		}
		for _, name := range reads {
			_, err := e.bsRead(ctx, name, 0, 0)
			wantCode(t, err, codes.InvalidArgument, fmt.Sprintf("Read(%q)", name))
		}
		writes := []string{
			"../uploads/" + u + "/blobs/" + p,
			"a/../uploads/" + u + "/blobs/" + p,
			"./uploads/" + u + "/blobs/" + p,
			"uploads/../blobs/" + p,
			"uploads/./blobs/" + p,
			"uploads/" + u + "/../blobs/" + p,
			"uploads/" + u + "/blobs/../" + p,
			"uploads/" + u + "/blobs/../../../tmp/x/" + p,
			"uploads//blobs/" + p,
			"uploads/" + u + "/compressed-blobs/../blobs/" + p,
			"blobs/" + p,
			"uploads/" + u,
			"uploads/" + u + "/blobs/" + d.Hex(),
		}
		for _, name := range writes {
			_, err := e.bsWrite(ctx, name, data, 0, len(data))
			wantCode(t, err, codes.InvalidArgument, fmt.Sprintf("Write(%q)", name))
			_, err = e.bs.QueryWriteStatus(ctx, &bspb.QueryWriteStatusRequest{ResourceName: name})
			wantCode(t, err, codes.InvalidArgument, fmt.Sprintf("QueryWriteStatus(%q)", name))
		}
		// Trailing metadata after the size of a write resource name is
		// allowed by REAPI.
		if _, err := e.bsWrite(ctx, writeName("", newUUID(), "blobs", fc, d)+"/some/metadata", data, 0, len(data)); err != nil {
			t.Fatalf("Write with trailing metadata: %v", err)
		}
	})
}

// TestByteStreamReadCancelled abandons reads midway; the server must cope.
func TestByteStreamReadCancelled(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	fc := fnCases[0]
	data := randBytes(5000, 8<<20)
	d := fc.digest(data)
	if _, err := e.bsWrite(testCtx(t), writeName("", newUUID(), "blobs", fc, d), data, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"blobs", "compressed-blobs/zstd"} {
		ctx, cancel := context.WithCancel(testCtx(t))
		stream, err := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: readName("", kind, fc, d)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := stream.Recv(); err != nil {
			t.Fatal(err)
		}
		cancel()
		for {
			if _, err := stream.Recv(); err != nil {
				if errors.Is(err, io.EOF) {
					t.Fatalf("cancelled %s read ended with EOF", kind)
				}
				break
			}
		}
	}
	got, err := e.bsRead(testCtx(t), readName("", "blobs", fc, d), 0, 0)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Read after cancelled reads: %v", err)
	}
}

// TestByteStreamResumableCompressedWrite resumes a compressed-blobs upload
// as REAPI specifies: the resuming stream's first write_offset is the
// uncompressed offset (QueryWriteStatus's committed_size), its data a new
// zstd stream of the rest, and later offsets add compressed bytes.
func TestByteStreamResumableCompressedWrite(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		data := randBytes(uint64(fc.fn)+7000, 3<<20)
		d := fc.digest(data)
		half := d.Size() / 2
		wname := writeName("", newUUID(), "compressed-blobs/zstd", fc, d)

		// The first stream carries the first half, compressed, then breaks.
		first := zstdCompress(t, data[:half])
		sctx, cancel := context.WithCancel(testCtx(t))
		stream, err := e.bs.Write(sctx)
		if err != nil {
			t.Fatal(err)
		}
		for off := 0; off < len(first); off += chunk64K {
			req := &bspb.WriteRequest{WriteOffset: int64(off), Data: first[off:min(off+chunk64K, len(first))]}
			if off == 0 {
				req.ResourceName = wname
			}
			if err := stream.Send(req); err != nil {
				t.Fatal(err)
			}
		}
		qs := e.waitCommitted(t, wname, half) // uncompressed bytes
		cancel()
		qs = e.waitCommitted(t, wname, half)

		// The resuming stream: write_offset half, then half + compressed bytes.
		rest := zstdCompress(t, data[qs.CommittedSize:])
		stream, err = e.bs.Write(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		for off := 0; off < len(rest); off += chunk64K {
			end := min(off+chunk64K, len(rest))
			req := &bspb.WriteRequest{WriteOffset: qs.CommittedSize + int64(off), Data: rest[off:end], FinishWrite: end == len(rest)}
			if off == 0 {
				req.ResourceName = wname
			}
			if err := stream.Send(req); err != nil {
				t.Fatal(err)
			}
		}
		resp, err := stream.CloseAndRecv()
		if err != nil {
			t.Fatalf("resumed compressed Write: %v", err)
		}
		if want := qs.CommittedSize + int64(len(rest)); resp.CommittedSize != want {
			t.Errorf("committed_size %d, want %d", resp.CommittedSize, want)
		}
		got, err := e.bsRead(testCtx(t), readName("", "blobs", fc, d), 0, 0)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("Read after the resumed compressed Write: %d bytes, %v", len(got), err)
		}
	})
}

// TestByteStreamConcurrentLargeReads reads large blobs from many streams
// at once, some of them abandoned midway. Reads send the store's direct-I/O
// buffers without copying and get them back only when grpc-go has written
// them, so a buffer handed back early would show as wrong bytes here.
func TestByteStreamConcurrentLargeReads(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := testCtx(t)
	fc := fnCases[0]
	var blobs [][]byte
	var names []string
	for i := range 4 {
		data := randBytes(uint64(900+i), 6<<20+i*4096+i)
		d := fc.digest(data)
		if _, err := e.bsWrite(ctx, writeName("", newUUID(), "blobs", fc, d), data, 0, 1<<20); err != nil {
			t.Fatal(err)
		}
		blobs, names = append(blobs, data), append(names, readName("", "blobs", fc, d))
	}
	errs := make(chan error, 32)
	for g := range 32 {
		go func() {
			i := g % len(blobs)
			if g%5 == 4 { // abandon the read after its first message
				cctx, cancel := context.WithCancel(ctx)
				s, err := e.bs.Read(cctx, &bspb.ReadRequest{ResourceName: names[i]})
				if err == nil {
					_, err = s.Recv()
				}
				cancel()
				errs <- err
				return
			}
			got, err := e.bsRead(ctx, names[i], 0, 0)
			if err == nil && !bytes.Equal(got, blobs[i]) {
				err = fmt.Errorf("blob %d: read %d bytes that differ from the %d written", i, len(got), len(blobs[i]))
			}
			errs <- err
		}()
	}
	for range 32 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// TestByteStreamConcurrentLargeWrites uploads distinct large blobs on many
// streams at once and reads each back. A received chunk's buffer goes back
// to the codec's pool once it is hashed and stored, for the next message;
// one given back early would show as a digest mismatch or wrong bytes.
func TestByteStreamConcurrentLargeWrites(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := testCtx(t)
	fc := fnCases[0]
	const n = 12
	errs := make(chan error, n)
	for g := range n {
		go func() {
			data := randBytes(uint64(1700+g), 4<<20+g*4097)
			d := fc.digest(data)
			if _, err := e.bsWrite(ctx, writeName("", newUUID(), "blobs", fc, d), data, 0, 1<<20); err != nil {
				errs <- fmt.Errorf("blob %d: write: %v", g, err)
				return
			}
			got, err := e.bsRead(ctx, readName("", "blobs", fc, d), 0, 0)
			if err == nil && !bytes.Equal(got, data) {
				err = fmt.Errorf("blob %d: read back %d bytes that differ from the %d written", g, len(got), len(data))
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}
