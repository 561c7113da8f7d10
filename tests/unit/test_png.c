/*
 * tests/unit/test_png.c — the eval plot's PNG writer and rasteriser
 * (daemon/png.c, compiled into this test directly since daemon/ is not in
 * libd2od.a): CRC-32 and Adler-32 check values, the byte layout of a small
 * image (signature, IHDR, stored deflate blocks, Adler-32, chunk CRCs), block
 * splitting past 65535 bytes, clipping and text.
 */
#include "daemon/png.c"
#include "tests/test.h"

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

TEST(checksum_check_values) {
    /* the standard check values of both algorithms */
    ASSERT_EQ(dmn_crc32(0, (const uint8_t *)"123456789", 9), 0xCBF43926u);
    ASSERT_EQ(dmn_adler32(1, (const uint8_t *)"Wikipedia", 9), 0x11E60398u);
    ASSERT_EQ(dmn_crc32(0, NULL, 0), 0u);
    ASSERT_EQ(dmn_adler32(1, NULL, 0), 1u);
    /* incremental = one pass */
    const uint8_t *s = (const uint8_t *)"The quick brown fox";
    ASSERT_EQ(dmn_crc32(dmn_crc32(0, s, 7), s + 7, 12), dmn_crc32(0, s, 19));
    ASSERT_EQ(dmn_adler32(dmn_adler32(1, s, 7), s + 7, 12), dmn_adler32(1, s, 19));
    /* Adler-32 over more than 5552 bytes of 0xff (the deferred-modulo bound) */
    uint8_t *big = malloc(100000);
    memset(big, 0xff, 100000);
    uint32_t a = 1, b = 0;
    for (int i = 0; i < 100000; i++) { a = (a + 0xff) % 65521; b = (b + a) % 65521; }
    ASSERT_EQ(dmn_adler32(1, big, 100000), (b << 16) | a);
    free(big);
}

/* Walks the chunks, checking each CRC; returns the IDAT payload (malloc'd). */
static uint8_t *check_chunks(const uint8_t *png, size_t n, uint32_t *w, uint32_t *h, size_t *zn) {
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (n < 8 || memcmp(png, sig, 8)) FAIL_("bad signature");
    size_t pos = 8;
    uint8_t *z = NULL;
    *zn = 0;
    int seen_end = 0;
    while (pos + 12 <= n) {
        uint32_t len = be32(png + pos);
        if (pos + 12 + len > n) FAIL_("chunk past the end");
        uint32_t crc = be32(png + pos + 8 + len);
        ASSERT_EQ(dmn_crc32(0, png + pos + 4, len + 4), crc);
        if (!memcmp(png + pos + 4, "IHDR", 4)) {
            ASSERT_EQ(len, 13u);
            *w = be32(png + pos + 8);
            *h = be32(png + pos + 12);
            ASSERT_EQ(png[pos + 16], 8);  /* depth */
            ASSERT_EQ(png[pos + 17], 2);  /* RGB */
            ASSERT_EQ(png[pos + 20], 0);  /* no interlace */
        } else if (!memcmp(png + pos + 4, "IDAT", 4)) {
            z = realloc(z, *zn + len);
            memcpy(z + *zn, png + pos + 8, len);
            *zn += len;
        } else if (!memcmp(png + pos + 4, "IEND", 4)) {
            seen_end = 1;
        }
        pos += 12 + len;
    }
    ASSERT_EQ(pos, n);
    ASSERT_EQ(seen_end, 1);
    return z;
}

/* Unpacks a zlib stream of stored blocks into raw (checks every header). */
static size_t unstore(const uint8_t *z, size_t zn, uint8_t *raw, size_t cap) {
    ASSERT_EQ(z[0], 0x78);
    ASSERT_EQ((z[0] * 256 + z[1]) % 31, 0);
    size_t pos = 2, out = 0;
    for (;;) {
        int final = z[pos] & 1;
        ASSERT_EQ(z[pos] >> 1, 0); /* BTYPE 00 */
        unsigned len = z[pos + 1] | z[pos + 2] << 8, nlen = z[pos + 3] | z[pos + 4] << 8;
        ASSERT_EQ(len ^ 0xffffu, nlen);
        pos += 5;
        if (out + len > cap) FAIL_("stored data larger than the image");
        memcpy(raw + out, z + pos, len);
        out += len;
        pos += len;
        if (final) break;
    }
    ASSERT_EQ(pos + 4, zn);
    ASSERT_EQ(be32(z + pos), dmn_adler32(1, raw, out));
    return out;
}

static void roundtrip(int w, int h) {
    size_t npx = (size_t)w * (size_t)h * 3;
    uint8_t *rgb = malloc(npx);
    for (size_t i = 0; i < npx; i++) rgb[i] = (uint8_t)(i * 7 + 3);
    uint8_t *png = NULL;
    size_t n = 0;
    ASSERT_OK(dmn_png_encode(rgb, w, h, &png, &n));
    uint32_t pw = 0, ph = 0;
    size_t zn = 0;
    uint8_t *z = check_chunks(png, n, &pw, &ph, &zn);
    ASSERT_EQ(pw, (uint32_t)w);
    ASSERT_EQ(ph, (uint32_t)h);
    size_t row = (size_t)w * 3 + 1;
    uint8_t *raw = malloc(row * (size_t)h);
    ASSERT_EQ(unstore(z, zn, raw, row * (size_t)h), row * (size_t)h);
    for (int y = 0; y < h; y++) {
        ASSERT_EQ(raw[(size_t)y * row], 0); /* filter none */
        if (memcmp(raw + (size_t)y * row + 1, rgb + (size_t)y * (size_t)w * 3, (size_t)w * 3))
            FAIL_("row %d differs", y);
    }
    free(raw);
    free(z);
    free(png);
    free(rgb);
}

TEST(encode_small_and_multi_block) {
    roundtrip(1, 1);
    roundtrip(2, 3);
    roundtrip(300, 200); /* 180,200 raw bytes: three stored blocks */
    uint8_t px[3] = {0};
    uint8_t *png = NULL;
    size_t n = 0;
    ASSERT_EQ(dmn_png_encode(px, 0, 1, &png, &n), D2_EINVAL);
    ASSERT_EQ(dmn_png_encode(NULL, 1, 1, &png, &n), D2_EINVAL);
}

TEST(canvas_clips_and_draws) {
    dmn_canvas c;
    ASSERT_OK(dmn_canvas_init(&c, 20, 10, (dmn_rgb){255, 255, 255}));
    dmn_rgb red = {255, 0, 0};
    dmn_canvas_line(&c, -50, 5, 80, 5, 1, red); /* clipped, no crash */
    for (int x = 0; x < 20; x++) ASSERT_EQ(c.rgb[(5 * 20 + x) * 3 + 1], 0);
    ASSERT_EQ(c.rgb[(4 * 20 + 3) * 3 + 1], 255);
    dmn_canvas_rect(&c, 15, 8, 40, 40, red);
    ASSERT_EQ(c.rgb[(9 * 20 + 19) * 3 + 1], 0);
    volatile int off_x = 20, off_y = 10; /* volatile: keeps GCC's -Warray-bounds off a guarded path */
    dmn_canvas_pixel(&c, -1, -1, red);
    dmn_canvas_pixel(&c, off_x, off_y, red);
    dmn_canvas_free(&c);

    ASSERT_OK(dmn_canvas_init(&c, 40, 9, (dmn_rgb){0, 0, 0}));
    int w = dmn_canvas_text(&c, 1, 1, "1%", 1, (dmn_rgb){9, 9, 9});
    ASSERT_EQ(w, dmn_canvas_text_width("1%", 1));
    ASSERT_EQ(w, 11);
    int ink = 0;
    for (int i = 0; i < 40 * 9; i++) ink += c.rgb[i * 3] == 9;
    /* '1' has 10 cells of ink, '%' 13 */
    ASSERT_EQ(ink, 23);
    dmn_canvas_free(&c);
    ASSERT_EQ(dmn_canvas_init(&c, 0, 5, (dmn_rgb){0, 0, 0}), D2_EINVAL);
}
