package blobstore

import (
	"container/list"
	"context"
	"io"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
)

// NewMemory returns a BlobAccess that keeps blobs in memory, bounded to
// maxSize bytes with least-recently-used eviction. It suits tests and small
// caches in front of a remote store.
func NewMemory(kind Kind, maxSize int64) BlobAccess {
	return &memory{kind: kind, max: maxSize, items: make(map[digest.Digest]*list.Element), byHash: hashIndex{}, lru: list.New()}
}

type memory struct {
	kind  Kind
	max   int64
	mu    sync.Mutex
	items map[digest.Digest]*list.Element // values are *memItem
	lru   *list.List                      // front is most recently used
	// byHash indexes the BLAKE3 items by hash (HashLookup).
	byHash hashIndex
	size   int64
}

type memItem struct {
	d    digest.Digest
	data []byte
}

func (m *memory) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	m.mu.Lock()
	e, ok := m.items[d]
	var data []byte
	if ok {
		m.lru.MoveToFront(e)
		// Read the slice under the lock: Put replaces it for an existing key.
		data = e.Value.(*memItem).data
	}
	m.mu.Unlock()
	if !ok {
		return nil, NotFound(m.kind, d)
	}
	return newBytesReadCloser(data), nil
}

func (m *memory) Put(ctx context.Context, d digest.Digest, r io.Reader) error {
	if m.kind == CAS && d.Size() > m.max {
		return status.Errorf(codes.ResourceExhausted, "blob %s is larger than the memory store (%d bytes)", d, m.max)
	}
	data, err := m.kind.readAll(d, r)
	if err != nil {
		return err
	}
	if int64(len(data)) > m.max {
		return status.Errorf(codes.ResourceExhausted, "blob %s is larger than the memory store (%d bytes)", d, m.max)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if e, ok := m.items[d]; ok {
		it := e.Value.(*memItem)
		m.size += int64(len(data)) - int64(len(it.data))
		it.data = data
		m.lru.MoveToFront(e)
	} else {
		m.items[d] = m.lru.PushFront(&memItem{d: d, data: data})
		m.byHash.add(d)
		m.size += int64(len(data))
	}
	for m.size > m.max {
		e := m.lru.Back()
		it := e.Value.(*memItem)
		m.lru.Remove(e)
		delete(m.items, it.d)
		m.byHash.remove(it.d)
		m.size -= int64(len(it.data))
	}
	return nil
}

func (m *memory) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	var missing []digest.Digest
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, d := range ds {
		if e, ok := m.items[d]; ok {
			m.lru.MoveToFront(e)
		} else {
			missing = append(missing, d)
		}
	}
	return missing, nil
}
