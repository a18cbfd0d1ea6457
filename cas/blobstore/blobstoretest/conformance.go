package blobstoretest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// LargeBlobSize is the size of the largest blob the suite stores (3 MiB).
const LargeBlobSize = 3 << 20

// RunConformance runs the behaviour every BlobAccess of the given kind must
// have, once for each supported digest function. newStore is called once
// per digest function and must return an empty store that holds at least
// 64 MiB without evicting anything; it registers its own cleanup with t.
// The subtests share that store, each with blobs of its own (which also
// checks that what one subtest does, such as failed Puts, does not disturb
// the others).
//
// For the CAS it checks: Put/Get round trips (empty, one-byte, all-zero,
// around the sizes backends special-case, and a 3 MiB blob) through a
// *bytes.Reader and a streaming reader; NotFound for missing blobs;
// FindMissing returning exactly the missing subset, duplicates allowed;
// InvalidArgument for data that does not match its digest (wrong hash, too
// short, too long) with nothing stored; a reader failing midway storing
// nothing; digests of different functions with the same hash being
// different blobs; 32 goroutines putting and getting overlapping blobs,
// including concurrent Puts of one blob, ending consistent.
//
// For the action cache it checks: values of arbitrary length, unrelated to
// the action digest's size, round-trip and are overwritten by a later Put;
// a failed Put (reader error, oversized entry) leaves the previous value;
// NotFound, FindMissing, function separation and concurrency as above.
func RunConformance(t *testing.T, kind blobstore.Kind, newStore func(t *testing.T) blobstore.BlobAccess) {
	for _, fn := range digest.Functions {
		t.Run(fn.String(), func(t *testing.T) {
			ba := newStore(t)
			if kind == blobstore.CAS {
				runCAS(t, fn, ba)
			} else {
				runAC(t, fn, ba)
			}
		})
	}
}

type suiteFunc func(t *testing.T, fn digest.Function, ba blobstore.BlobAccess)

func runCAS(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	for _, tc := range []struct {
		name string
		f    suiteFunc
	}{
		{"EmptyDigestMismatch", casEmptyDigestMismatch},
		{"RoundTrip", casRoundTrip},
		{"GetMissing", casGetMissing},
		{"FindMissing", casFindMissing},
		{"PutIdempotent", casPutIdempotent},
		{"PutMismatch", casPutMismatch},
		{"PutReaderError", casPutReaderError},
		{"FunctionsSeparate", functionsSeparate(blobstore.CAS)},
		{"GetAbandoned", casGetAbandoned},
		{"CallerBufferNotRetained", casCallerBufferNotRetained},
		{"Concurrent", casConcurrent},
		{"PutBatch", casPutBatch},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.f(t, fn, ba) })
	}
}

func runAC(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	for _, tc := range []struct {
		name string
		f    suiteFunc
	}{
		{"RoundTrip", acRoundTrip},
		{"Overwrite", acOverwrite},
		{"GetMissing", casGetMissing},
		{"FindMissing", casFindMissing},
		{"PutReaderError", acPutReaderError},
		{"TooLarge", acTooLarge},
		{"FunctionsSeparate", functionsSeparate(blobstore.AC)},
		{"Concurrent", acConcurrent},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.f(t, fn, ba) })
	}
}

// roundTripSizes are the blob sizes the round-trip tests use: edge cases,
// the boundaries of the backends' in-memory fast paths, and a large blob.
var roundTripSizes = []int{0, 1, 2, 100, 4096, 64<<10 + 1, 1 << 20, 1<<20 + 1, LargeBlobSize}

func casRoundTrip(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	for i, rd := range Readers {
		t.Run(rd.Name, func(t *testing.T) {
			var blobs []Blob
			for _, n := range roundTripSizes {
				blobs = append(blobs, RandomBlob(rng, fn, n))
			}
			// Non-empty blobs of zero bytes: the data is all NUL. Their
			// lengths differ per reader, so that each reader stores them.
			blobs = append(blobs, NewBlob(fn, make([]byte, 1+i)), NewBlob(fn, make([]byte, 1000+i)))
			for _, b := range blobs {
				if err := ba.Put(context.Background(), b.Digest, rd.New(b.Data)); err != nil {
					t.Fatalf("Put(%s): %v", b.Digest.Sprint(), err)
				}
				WantBlob(t, ba, b.Digest, b.Data)
			}
			// Everything is still there after all the Puts, also through
			// GetBytes, and one FindMissing call reports nothing missing.
			var ds []digest.Digest
			for _, b := range blobs {
				WantBlob(t, ba, b.Digest, b.Data)
				got, err := blobstore.GetBytes(context.Background(), ba, b.Digest, 1<<30)
				if err != nil {
					t.Fatalf("GetBytes(%s): %v", b.Digest.Sprint(), err)
				}
				if !bytes.Equal(got, b.Data) {
					t.Fatalf("GetBytes(%s) returned wrong data", b.Digest.Sprint())
				}
				ds = append(ds, b.Digest)
			}
			missing, err := ba.FindMissing(context.Background(), ds)
			if err != nil || len(missing) != 0 {
				t.Fatalf("FindMissing of stored blobs = %v, %v; want none", missing, err)
			}
		})
	}
}

func casGetMissing(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	stored := RandomBlob(rng, fn, 10)
	MustPut(t, ba, stored.Digest, stored.Data)
	for _, n := range []int{1, 10, 5000} {
		d := FreshBlob(t, ba, rng, fn, n).Digest
		WantAbsent(t, ba, d)
		_, err := blobstore.GetBytes(context.Background(), ba, d, 1<<20)
		WantCode(t, err, codes.NotFound, "GetBytes of a missing blob")
	}
	// Same hash as a stored blob, different size: a different blob.
	other := digest.New(fn, stored.Digest.Hash(), stored.Digest.Size()+1)
	WantAbsent(t, ba, other)
}

func casFindMissing(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	ctx := context.Background()

	if missing, err := ba.FindMissing(ctx, nil); err != nil || len(missing) != 0 {
		t.Fatalf("FindMissing(nil) = %v, %v; want nothing", missing, err)
	}
	if missing, err := ba.FindMissing(ctx, []digest.Digest{}); err != nil || len(missing) != 0 {
		t.Fatalf("FindMissing([]) = %v, %v; want nothing", missing, err)
	}

	present := map[digest.Digest]bool{}
	var all []digest.Digest
	for i := 0; i < 40; i++ {
		b := FreshBlob(t, ba, rng, fn, 1+rng.IntN(300))
		if i%2 == 0 {
			MustPut(t, ba, b.Digest, b.Data)
			present[b.Digest] = true
		}
		all = append(all, b.Digest)
	}
	checkFindMissing(t, ba, all, present)

	// Duplicates of present and missing digests, shuffled.
	query := append([]digest.Digest(nil), all...)
	query = append(query, all[0], all[1], all[1], all[2], all[3], all[3])
	rng.Shuffle(len(query), func(i, j int) { query[i], query[j] = query[j], query[i] })
	checkFindMissing(t, ba, query, present)

	// Only present, only missing.
	var onlyPresent, onlyMissing []digest.Digest
	for _, d := range all {
		if present[d] {
			onlyPresent = append(onlyPresent, d)
		} else {
			onlyMissing = append(onlyMissing, d)
		}
	}
	checkFindMissing(t, ba, onlyPresent, present)
	checkFindMissing(t, ba, onlyMissing, present)
}

// checkFindMissing checks that FindMissing(query) returns exactly the
// digests of query not in present (each at least once, and nothing else).
func checkFindMissing(t *testing.T, ba blobstore.BlobAccess, query []digest.Digest, present map[digest.Digest]bool) {
	t.Helper()
	missing, err := ba.FindMissing(context.Background(), query)
	if err != nil {
		t.Fatalf("FindMissing: %v", err)
	}
	inQuery := map[digest.Digest]bool{}
	for _, d := range query {
		inQuery[d] = true
	}
	got := map[digest.Digest]bool{}
	for _, d := range missing {
		if !inQuery[d] {
			t.Errorf("FindMissing returned %s, which was not asked for", d.Sprint())
		}
		if present[d] {
			t.Errorf("FindMissing returned %s, which is stored", d.Sprint())
		}
		got[d] = true
	}
	if len(missing) > len(query) {
		t.Errorf("FindMissing returned %d digests for a query of %d", len(missing), len(query))
	}
	for d := range inQuery {
		if !present[d] && !got[d] {
			t.Errorf("FindMissing did not return missing digest %s", d.Sprint())
		}
	}
}

func casPutIdempotent(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	for _, n := range []int{0, 100, 2 << 20} {
		b := RandomBlob(rng, fn, n)
		for i, rd := range []int{0, 1, 0} {
			if err := ba.Put(context.Background(), b.Digest, Readers[rd].New(b.Data)); err != nil {
				t.Fatalf("Put #%d of %s: %v", i+1, b.Digest.Sprint(), err)
			}
			WantBlob(t, ba, b.Digest, b.Data)
		}
	}
}

func casPutMismatch(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	for _, n := range []int{1, 1000, 2 << 20} {
		for _, rd := range Readers {
			for _, mk := range []struct {
				name string
				data func(good []byte) []byte
			}{
				{"wrong hash", func(good []byte) []byte {
					b := bytes.Clone(good)
					b[len(b)/2] ^= 0x40
					return b
				}},
				{"short", func(good []byte) []byte { return good[:len(good)-1] }},
				{"empty", func(good []byte) []byte { return nil }},
				{"long", func(good []byte) []byte { return append(bytes.Clone(good), 'x') }},
				{"double", func(good []byte) []byte { return append(bytes.Clone(good), good...) }},
			} {
				// A blob of its own per case: a backend may skip reading
				// the data of a blob it already has.
				good := FreshBlob(t, ba, rng, fn, n)
				tc := struct{ data []byte }{mk.data(good.Data)}
				t.Run(fmt.Sprintf("%d/%s/%s", n, rd.Name, mk.name), func(t *testing.T) {
					own := digest.Compute(fn, tc.data)
					ownBefore := Present(t, ba, own) // the empty blob may be stored
					err := ba.Put(context.Background(), good.Digest, rd.New(tc.data))
					WantCode(t, err, codes.InvalidArgument, "Put of mismatching data")
					WantAbsent(t, ba, good.Digest)
					// Nor is the data stored under its own digest.
					if !ownBefore {
						WantAbsent(t, ba, own)
					}
					// The failed Put does not poison the digest.
					MustPut(t, ba, good.Digest, good.Data)
					WantBlob(t, ba, good.Digest, good.Data)
				})
			}
		}
	}
}

// casEmptyDigestMismatch runs first, on the empty store: data under the
// digest of the empty blob is refused.
func casEmptyDigestMismatch(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	empty := digest.Empty(fn)
	for _, rd := range Readers {
		err := ba.Put(context.Background(), empty, rd.New([]byte("x")))
		WantCode(t, err, codes.InvalidArgument, "Put of data under the empty digest")
		WantAbsent(t, ba, empty)
	}
	MustPut(t, ba, empty, nil)
	WantBlob(t, ba, empty, nil)
}

func casPutReaderError(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	for _, n := range []int{1000, 1 << 20, 2 << 20} {
		for _, after := range []int{0, 1, n / 2, n - 1, n} {
			b := FreshBlob(t, ba, rng, fn, n)
			t.Run(fmt.Sprintf("%d/after%d", n, after), func(t *testing.T) {
				err := ba.Put(context.Background(), b.Digest, ErrAfterReader(b.Data, after))
				if err == nil {
					t.Fatalf("Put with a reader failing after %d of %d bytes succeeded", after, n)
				}
				// Either the reader's own error, passed through, or a status.
				if _, ok := status.FromError(err); !ok && !errors.Is(err, ErrInjected) {
					t.Errorf("Put error %v (%T) is neither a status error nor the reader's error", err, err)
				}
				WantAbsent(t, ba, b.Digest)
				MustPut(t, ba, b.Digest, b.Data)
				WantBlob(t, ba, b.Digest, b.Data)
			})
		}
	}
}

// functionsSeparate checks that a blob stored under one digest function is
// not visible under the other with the same hash and size.
func functionsSeparate(kind blobstore.Kind) suiteFunc {
	return func(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
		rng := Rand(t)
		for _, n := range []int{0, 7, 5000} {
			b := RandomBlob(rng, fn, n)
			value := b.Data
			if kind == blobstore.AC {
				value = RandomBytes(rng, 50)
			}
			MustPut(t, ba, b.Digest, value)
			other := OtherFunction(b.Digest)
			if other.Hex() != b.Digest.Hex() || other.Size() != b.Digest.Size() || other == b.Digest {
				t.Fatalf("test bug: OtherFunction(%s) = %s", b.Digest.Sprint(), other.Sprint())
			}
			WantAbsent(t, ba, other)
			WantBlob(t, ba, b.Digest, value)
			// Both functions' digests of the same data coexist.
			if kind == blobstore.CAS {
				od := digest.Compute(other.Function(), b.Data)
				MustPut(t, ba, od, b.Data)
				WantBlob(t, ba, od, b.Data)
				WantBlob(t, ba, b.Digest, b.Data)
			}
		}
	}
}

func casGetAbandoned(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	b := RandomBlob(rng, fn, 2<<20)
	MustPut(t, ba, b.Digest, b.Data)
	for _, n := range []int{0, 1, 100000} {
		rc, err := ba.Get(context.Background(), b.Digest)
		if err != nil {
			t.Fatalf("Get: %v", err)
		}
		buf := make([]byte, n)
		if _, err := io.ReadFull(rc, buf); err != nil {
			t.Fatalf("reading %d bytes: %v", n, err)
		}
		if !bytes.Equal(buf, b.Data[:n]) {
			t.Fatalf("first %d bytes differ", n)
		}
		if err := rc.Close(); err != nil {
			t.Fatalf("Close after reading %d bytes: %v", n, err)
		}
		WantBlob(t, ba, b.Digest, b.Data)
	}
}

func casCallerBufferNotRetained(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	for _, rd := range Readers {
		b := RandomBlob(rng, fn, 4096)
		buf := bytes.Clone(b.Data)
		if err := ba.Put(context.Background(), b.Digest, rd.New(buf)); err != nil {
			t.Fatalf("Put: %v", err)
		}
		for i := range buf {
			buf[i] = 0xAA
		}
		WantBlob(t, ba, b.Digest, b.Data)
	}
}

// concurrencyWorkers is the number of goroutines of the concurrency tests.
const concurrencyWorkers = 32

func casConcurrent(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	ctx := context.Background()

	var blobs []Blob
	for i := 0; i < 24; i++ {
		n := rng.IntN(64 << 10)
		switch i {
		case 0:
			n = 0
		case 1:
			n = 1
		case 2:
			n = 1<<20 + 3
		}
		blobs = append(blobs, RandomBlob(rng, fn, n))
	}
	hot := RandomBlob(rng, fn, 300<<10)
	// stored[i] is set once a Put of blobs[i] has returned success; a Get
	// or FindMissing that starts afterwards must see the blob.
	stored := make([]atomic.Bool, len(blobs))

	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, concurrencyWorkers)
	for w := 0; w < concurrencyWorkers; w++ {
		seed := rng.Uint64()
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- casWorker(ctx, ba, w, seed, start, hot, blobs, stored)
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if t.Failed() {
		return
	}
	WantBlob(t, ba, hot.Digest, hot.Data)
	var ds []digest.Digest
	for i, b := range blobs {
		if stored[i].Load() {
			WantBlob(t, ba, b.Digest, b.Data)
			ds = append(ds, b.Digest)
		}
	}
	if missing, err := ba.FindMissing(ctx, ds); err != nil || len(missing) != 0 {
		t.Fatalf("FindMissing after the concurrent phase = %v, %v; want nothing missing", missing, err)
	}
}

func casWorker(ctx context.Context, ba blobstore.BlobAccess, w int, seed uint64, start chan struct{}, hot Blob, blobs []Blob, stored []atomic.Bool) error {
	rng := rand.New(rand.NewPCG(seed, uint64(w)))
	<-start
	// Everybody stores the same blob at once, half through each reader.
	if err := ba.Put(ctx, hot.Digest, Readers[w%2].New(hot.Data)); err != nil {
		return fmt.Errorf("worker %d: concurrent Put of the same blob: %v", w, err)
	}
	if got, err := ReadBlob(ctx, ba, hot.Digest); err != nil || !bytes.Equal(got, hot.Data) {
		return fmt.Errorf("worker %d: Get of the hot blob after its Put: %d bytes, %v", w, len(got), err)
	}
	for op := 0; op < 40; op++ {
		i := rng.IntN(len(blobs))
		b := blobs[i]
		switch r := rng.IntN(10); {
		case r < 4:
			if err := ba.Put(ctx, b.Digest, Readers[rng.IntN(2)].New(b.Data)); err != nil {
				return fmt.Errorf("worker %d: Put(%s): %v", w, b.Digest.Sprint(), err)
			}
			stored[i].Store(true)
		case r < 8:
			was := stored[i].Load()
			got, err := ReadBlob(ctx, ba, b.Digest)
			switch {
			case err == nil:
				if !bytes.Equal(got, b.Data) {
					return fmt.Errorf("worker %d: Get(%s) returned %d wrong bytes", w, b.Digest.Sprint(), len(got))
				}
			case status.Code(err) == codes.NotFound:
				if was {
					return fmt.Errorf("worker %d: Get(%s) is NotFound after a Put of it returned", w, b.Digest.Sprint())
				}
			default:
				return fmt.Errorf("worker %d: Get(%s): %v", w, b.Digest.Sprint(), err)
			}
		default:
			var ds []digest.Digest
			var want []bool
			for k := 0; k < 5; k++ {
				j := rng.IntN(len(blobs))
				ds = append(ds, blobs[j].Digest)
				want = append(want, stored[j].Load())
			}
			missing, err := ba.FindMissing(ctx, ds)
			if err != nil {
				return fmt.Errorf("worker %d: FindMissing: %v", w, err)
			}
			for _, m := range missing {
				for k, d := range ds {
					if d == m && want[k] {
						return fmt.Errorf("worker %d: FindMissing reports %s missing after a Put of it returned", w, d.Sprint())
					}
				}
			}
		}
	}
	return nil
}

func acRoundTrip(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	for _, rd := range Readers {
		t.Run(rd.Name, func(t *testing.T) {
			type entry struct {
				d     digest.Digest
				value []byte
			}
			var entries []entry
			for _, n := range []int{0, 1, 2, 100, 4096, 64<<10 + 1, 1<<20 + 1, LargeBlobSize} {
				// The action digest's size has nothing to do with the
				// length of the value stored under it.
				action := RandomBlob(rng, fn, 1+rng.IntN(500)).Digest
				entries = append(entries, entry{action, RandomBytes(rng, n)})
			}
			entries = append(entries, entry{RandomBlob(rng, fn, 10).Digest, make([]byte, 1000)})
			for _, e := range entries {
				if err := ba.Put(context.Background(), e.d, rd.New(e.value)); err != nil {
					t.Fatalf("Put(%s, %d bytes): %v", e.d.Sprint(), len(e.value), err)
				}
				WantBlob(t, ba, e.d, e.value)
			}
			for _, e := range entries {
				WantBlob(t, ba, e.d, e.value)
				got, err := blobstore.GetBytes(context.Background(), ba, e.d, blobstore.MaxACEntrySize)
				if err != nil || !bytes.Equal(got, e.value) {
					t.Fatalf("GetBytes(%s) = %d bytes, %v; want %d bytes", e.d.Sprint(), len(got), err, len(e.value))
				}
			}
		})
	}
}

func acOverwrite(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	action := RandomBlob(rng, fn, 140).Digest
	neighbour := RandomBlob(rng, fn, 140).Digest
	nv := RandomBytes(rng, 77)
	MustPut(t, ba, neighbour, nv)
	for i, n := range []int{1000, 10, 0, 200 << 10, 5000, 1 << 20} {
		v := RandomBytes(rng, n)
		if err := ba.Put(context.Background(), action, Readers[i%2].New(v)); err != nil {
			t.Fatalf("Put #%d (%d bytes): %v", i+1, n, err)
		}
		WantBlob(t, ba, action, v)
	}
	WantBlob(t, ba, neighbour, nv)
}

func acPutReaderError(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	fresh := RandomBlob(rng, fn, 140).Digest
	existing := RandomBlob(rng, fn, 140).Digest
	old := RandomBytes(rng, 3000)
	MustPut(t, ba, existing, old)
	v := RandomBytes(rng, 2<<20)
	for _, after := range []int{0, 1, 1000, 1 << 20, len(v)} {
		err := ba.Put(context.Background(), fresh, ErrAfterReader(v, after))
		if err == nil {
			t.Fatalf("Put with a reader failing after %d bytes succeeded", after)
		}
		WantAbsent(t, ba, fresh)
		if err := ba.Put(context.Background(), existing, ErrAfterReader(v, after)); err == nil {
			t.Fatalf("overwriting Put with a reader failing after %d bytes succeeded", after)
		}
		WantBlob(t, ba, existing, old)
	}
}

func acTooLarge(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	fresh := RandomBlob(rng, fn, 140).Digest
	existing := RandomBlob(rng, fn, 140).Digest
	old := RandomBytes(rng, 100)
	MustPut(t, ba, existing, old)
	huge := make([]byte, blobstore.MaxACEntrySize+1)
	for _, d := range []digest.Digest{fresh, existing} {
		err := ba.Put(context.Background(), d, StreamReader(huge))
		if c := status.Code(err); c != codes.InvalidArgument && c != codes.ResourceExhausted {
			t.Fatalf("Put of a %d-byte action cache entry: %v; want InvalidArgument or ResourceExhausted", len(huge), err)
		}
	}
	WantAbsent(t, ba, fresh)
	WantBlob(t, ba, existing, old)
}

func acConcurrent(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	ctx := context.Background()
	var actions []digest.Digest
	for i := 0; i < 8; i++ {
		actions = append(actions, RandomBlob(rng, fn, 100+i).Digest)
	}
	// written[i] holds the SHA-256 of every value a Put under actions[i]
	// has been started with; whatever a Get returns must be one of them,
	// whole.
	written := make([]sync.Map, len(actions))
	stored := make([]atomic.Bool, len(actions))
	var wg sync.WaitGroup
	errs := make(chan error, concurrencyWorkers)
	start := make(chan struct{})
	for w := 0; w < concurrencyWorkers; w++ {
		seed := rng.Uint64()
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- func() error {
				rng := rand.New(rand.NewPCG(seed, uint64(w)))
				<-start
				for op := 0; op < 20; op++ {
					i := rng.IntN(len(actions))
					if i == 0 || rng.IntN(2) == 0 {
						v := RandomBytes(rng, rng.IntN(20<<10))
						written[i].Store(sha256.Sum256(v), true)
						if err := ba.Put(ctx, actions[i], Readers[rng.IntN(2)].New(v)); err != nil {
							return fmt.Errorf("worker %d: Put: %v", w, err)
						}
						stored[i].Store(true)
						continue
					}
					was := stored[i].Load()
					got, err := ReadBlob(ctx, ba, actions[i])
					switch {
					case err == nil:
						if _, ok := written[i].Load(sha256.Sum256(got)); !ok {
							return fmt.Errorf("worker %d: Get returned a %d-byte value that was never put", w, len(got))
						}
					case status.Code(err) == codes.NotFound:
						if was {
							return fmt.Errorf("worker %d: Get is NotFound after a Put returned", w)
						}
					default:
						return fmt.Errorf("worker %d: Get: %v", w, err)
					}
				}
				return nil
			}()
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	for i, a := range actions {
		if !stored[i].Load() {
			continue
		}
		got := MustGet(t, ba, a)
		if _, ok := written[i].Load(sha256.Sum256(got)); !ok {
			t.Errorf("final value of action %d was never put", i)
		}
	}
}

// casPutBatch stores a batch with good, duplicate, already stored, large
// and bad blobs through blobstore.PutBatch (the store's own PutBatch if it
// has one): exactly the good ones are stored, each bad one gets
// InvalidArgument.
func casPutBatch(t *testing.T, fn digest.Function, ba blobstore.BlobAccess) {
	rng := Rand(t)
	ctx := context.Background()
	stored := FreshBlob(t, ba, rng, fn, 77)
	MustPut(t, ba, stored.Digest, stored.Data)
	var batch []blobstore.Blob
	var good []Blob
	for i := 0; i < 300; i++ {
		b := FreshBlob(t, ba, rng, fn, 1+i*7%500)
		good = append(good, b)
		batch = append(batch, blobstore.Blob{Digest: b.Digest, Data: b.Data})
	}
	large := FreshBlob(t, ba, rng, fn, 200<<10)
	good = append(good, large)
	batch = append(batch, blobstore.Blob{Digest: large.Digest, Data: large.Data})
	batch = append(batch, blobstore.Blob{Digest: good[0].Digest, Data: good[0].Data}) // duplicate
	batch = append(batch, blobstore.Blob{Digest: stored.Digest, Data: stored.Data})   // already stored
	wrong := FreshBlob(t, ba, rng, fn, 100)
	other := RandomBytes(rng, 100)
	short := FreshBlob(t, ba, rng, fn, 100)
	bad := len(batch)
	batch = append(batch,
		blobstore.Blob{Digest: wrong.Digest, Data: other},
		blobstore.Blob{Digest: short.Digest, Data: short.Data[:99]})
	errs := blobstore.PutBatch(ctx, ba, batch)
	if len(errs) != len(batch) {
		t.Fatalf("PutBatch returned %d results for %d blobs", len(errs), len(batch))
	}
	for i := 0; i < bad; i++ {
		if errs[i] != nil {
			t.Errorf("blob %d (%s): %v", i, batch[i].Digest, errs[i])
		}
	}
	WantCode(t, errs[bad], codes.InvalidArgument, "batch blob with wrong data")
	WantCode(t, errs[bad+1], codes.InvalidArgument, "batch blob with short data")
	for _, b := range append(good, stored) {
		WantBlob(t, ba, b.Digest, b.Data)
	}
	WantAbsent(t, ba, wrong.Digest)
	WantAbsent(t, ba, short.Digest)
	WantAbsent(t, ba, digest.Compute(fn, other))
}
