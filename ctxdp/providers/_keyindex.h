/* SPDX-License-Identifier: Apache-2.0 */
/* _keyindex.h — the XDP provider's key -> slot index, in memory taken once.
 *
 * Contract (plain C; _fastadd.c wraps it as _fastadd.KeyIndex):
 *   Each of ``nslots`` slots holds up to two keys, its connection's two
 *   direction entries (dir 0 and 1), of one length (1..KI_KMAX bytes), in
 *   its record. A key is held by at most one (slot, dir): ki_find returns
 *   that ref, 2 * slot + dir, or -1. The caller passes each key's hash
 *   (any 64-bit hash of the key bytes; _fastadd uses Python's keyed bytes
 *   hash, so a peer choosing addresses and ports cannot aim its keys at one
 *   probe chain) and keeps the records and the table in step: a key is
 *   written into its record before ki_insert and removed with ki_remove
 *   before its record changes.
 *
 *   Memory: the records (sizeof(struct ki_rec) per slot) and a table of
 *   8-byte entries with room for twice the most keys there can be (load
 *   <= 1/2: a probe always meets an empty entry). ki_init maps both and has
 *   the kernel populate them; nothing is allocated or first touched after
 *   that. That is the point: a Python dict of key bytes grew by doubling
 *   and each connection cost two bytes objects and a tuple, ~350 bytes of
 *   fresh memory per install, which on this project's VMs costs more than
 *   the kernel's hash inserts (docs/architecture.md).
 *
 *   Collisions: open addressing with linear probing; a removal shifts the
 *   rest of its cluster back (no tombstones, so probes never lengthen with
 *   churn).
 */
#ifndef CTXDP_KEYINDEX_H
#define CTXDP_KEYINDEX_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define KI_KMAX 44 /* sizeof(struct ct_flow_key), the longest map key */
#define KI_MAX_SLOTS (1u << 28)

struct ki_rec {
	uint8_t nk;   /* keys held: dirs 0 .. nk - 1 */
	uint8_t klen; /* their length in bytes */
	uint8_t k[2][KI_KMAX];
};

struct ki_ent {
	uint32_t tag;  /* low 32 bits of the key's hash; home entry: tag & mask */
	uint32_t ref1; /* 2 * slot + dir + 1; 0: empty */
};

struct keyindex {
	struct ki_rec *rec;
	struct ki_ent *tab;
	uint32_t nslots;
	uint32_t mask; /* table entries - 1 */
	uint64_t nkeys;
	size_t rec_len, tab_len; /* bytes mapped */
};

static void ki_free(struct keyindex *ki)
{
	if (ki->rec)
		munmap(ki->rec, ki->rec_len);
	if (ki->tab)
		munmap(ki->tab, ki->tab_len);
	ki->rec = NULL;
	ki->tab = NULL;
}

static void *ki_map(size_t len)
{
	/* MAP_POPULATE: the kernel faults every page in now, in one call,
	 * instead of one fault per page on the install path. */
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

/* 0, or -1 with errno set (EINVAL: nslots out of range; ENOMEM). */
static int ki_init(struct keyindex *ki, uint32_t nslots)
{
	memset(ki, 0, sizeof(*ki));
	if (nslots == 0 || nslots > KI_MAX_SLOTS) {
		errno = EINVAL;
		return -1;
	}
	uint64_t size = 16;
	while (size < 4ull * nslots) /* 2 keys per slot, load <= 1/2 */
		size <<= 1;
	ki->rec_len = (size_t)nslots * sizeof(struct ki_rec);
	ki->tab_len = (size_t)size * sizeof(struct ki_ent);
	if (!(ki->rec = ki_map(ki->rec_len)) || !(ki->tab = ki_map(ki->tab_len))) {
		ki_free(ki);
		errno = ENOMEM;
		return -1;
	}
	ki->nslots = nslots;
	ki->mask = (uint32_t)(size - 1);
	return 0;
}

static void ki_clear(struct keyindex *ki)
{
	memset(ki->rec, 0, ki->rec_len);
	memset(ki->tab, 0, ki->tab_len);
	ki->nkeys = 0;
}

/* The ref (2 * slot + dir) holding ``key``, or -1. */
static inline int64_t ki_find(const struct keyindex *ki, const void *key, uint32_t klen,
			      uint64_t hash)
{
	uint32_t tag = (uint32_t)hash;
	for (uint32_t i = tag & ki->mask;; i = (i + 1) & ki->mask) {
		const struct ki_ent *e = &ki->tab[i];
		if (!e->ref1)
			return -1;
		if (e->tag != tag)
			continue;
		uint32_t ref = e->ref1 - 1;
		const struct ki_rec *r = &ki->rec[ref >> 1];
		if (r->klen == klen && memcmp(r->k[ref & 1], key, klen) == 0)
			return ref;
	}
}

/* Enter ``ref``, whose key (with ``hash``) is already in its record and
 * held by no one. */
static inline void ki_insert(struct keyindex *ki, uint32_t ref, uint64_t hash)
{
	uint32_t tag = (uint32_t)hash, i = tag & ki->mask;
	while (ki->tab[i].ref1)
		i = (i + 1) & ki->mask;
	ki->tab[i].tag = tag;
	ki->tab[i].ref1 = ref + 1;
	ki->nkeys++;
}

/* Take ``ref`` (its key's hash is ``hash``) out of the table. */
static inline void ki_remove(struct keyindex *ki, uint32_t ref, uint64_t hash)
{
	uint32_t mask = ki->mask, i = (uint32_t)hash & mask;
	while (ki->tab[i].ref1 != ref + 1) {
		if (!ki->tab[i].ref1)
			return; /* not entered: nothing to do */
		i = (i + 1) & mask;
	}
	/* Backward shift: an entry later in the cluster moves into the hole
	 * unless its home lies cyclically in (hole, its position]. */
	for (uint32_t j = i;;) {
		j = (j + 1) & mask;
		if (!ki->tab[j].ref1)
			break;
		uint32_t home = ki->tab[j].tag & mask;
		if (i <= j ? (i < home && home <= j) : (i < home || home <= j))
			continue;
		ki->tab[i] = ki->tab[j];
		i = j;
	}
	ki->tab[i].tag = 0;
	ki->tab[i].ref1 = 0;
	ki->nkeys--;
}

#endif /* CTXDP_KEYINDEX_H */
